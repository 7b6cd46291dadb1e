"""One iteration's batch and its two halves: the batch containers (engine/iteration/batch.py), the
micro-batch cut, collect (generate, score, log pi_t / log pi_ref, rewards through the algorithm) and
update (epochs of optimizer steps on the algorithm's loss). Imports: engine.model, engine.data,
engine.runtime, engine.algorithms, engine.config."""
