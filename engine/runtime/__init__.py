"""What keeps a run alive and reports on it: processes and FSDP2 (parallel), precision, atomic
checkpoints and the export, metrics / plots / progress, the run directory's lock and the parent watch.
Imports: torch; nothing of the engine outside this folder."""
