"""Where a run's records go: the engine's logger on stderr (through the progress bar) and in
run_dir/train.log, library warnings in the file only."""
from __future__ import annotations

import logging
import os

from .parallel import Dist


class _BarSafeHandler(logging.StreamHandler):
    """stderr through tqdm.write when tqdm is there, so that a record never breaks the progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm
        except ImportError:
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(run_dir: str, d: Dist) -> None:
    """The engine's records on stderr (main process: INFO, others: WARNING) and in run_dir/train.log (main
    process); warnings of libraries (warnings.warn) go to train.log only, never through the bar. Calling it
    again (another run in the same process) replaces what an earlier call installed."""
    fmt = logging.Formatter("%(asctime)s %(message)s")
    root = logging.getLogger()
    # library warnings: warnings.warn, and transformers' own warning records (deprecations, ...)
    py_warnings = logging.getLogger("py.warnings")
    for logger in (root, py_warnings, logging.getLogger("transformers")):
        for handler in [h for h in logger.handlers if getattr(h, "_rebel", False)]:
            logger.removeHandler(handler)
            handler.close()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
        if d.is_main:
            hf_logging.disable_default_handler()  # its stderr handler: its records join py.warnings' file
            hf_logging.get_logger().addHandler(_ForwardTo(py_warnings))
    except ImportError:
        pass
    root.setLevel(logging.INFO if d.is_main else logging.WARNING)
    handlers = [(_BarSafeHandler(), root)]
    if d.is_main:
        log_file = os.path.join(run_dir, "train.log")
        handlers += [(logging.FileHandler(log_file, encoding="utf-8"), root),
                     (logging.FileHandler(log_file, encoding="utf-8"), py_warnings)]
    for handler, logger in handlers:
        handler._rebel = True
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logging.captureWarnings(True)
    py_warnings.propagate = not d.is_main  # other ranks have no log file: their warnings reach stderr


class _ForwardTo(logging.Handler):
    """Hands records to another logger's handlers (transformers' records -> train.log)."""

    _rebel = True

    def __init__(self, target: logging.Logger):
        super().__init__()
        self.target = target

    def emit(self, record):
        for handler in self.target.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
