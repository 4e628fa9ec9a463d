"""`cpt prepare` on many machines through datatrove's executors (local, Slurm, Ray).

Each datatrove task (rank r of world W) tokenizes the shards u of every task with u % W == r
(`cpt.data.prepare`), into the shared cache; the units are the same whatever W is, and a unit whose
json exists is skipped, so a re-submitted job does only what is missing. Afterwards one
`cpt prepare CONFIG` (any machine that sees the cache) finds every unit done and writes each task's
entry (document numbering, train / validation views, manifest) in seconds. The tokenizer must exist
before the job starts (`tokenizer.path`, or run `cpt prepare CONFIG --tokenizer-only` once), so
that every rank tokenizes with the same one.

    from datatrove.executor import SlurmPipelineExecutor
    from cpt.data.engine import CptPrepare

    SlurmPipelineExecutor(
        pipeline=[CptPrepare("run.yaml")], tasks=64, time="12:00:00", partition="cpu",
        logging_dir="logs/prepare", job_name="cpt-prepare", cpus_per_task=8,
    ).run()
"""

from __future__ import annotations

from datatrove.pipeline.base import PipelineStep


class CptPrepare(PipelineStep):
    name = "cpt prepare"
    type = "🔢 - TOKENIZER"

    def __init__(self, config: str, overrides: list[str] | None = None, workers: int = 1) -> None:
        """`config`: a run YAML (its tasks, tokenizer, cache_dir and prepare settings); `workers` per datatrove task."""
        super().__init__()
        self.config = str(config)
        self.overrides = list(overrides or [])
        self.workers = workers

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from cpt.config import load_config
        from cpt.data.prepare import Settings
        from cpt.training.build import prepare_config

        cfg = load_config(self.config, self.overrides)
        settings = Settings(workers=self.workers, shard_mb=cfg.prepare.shard_mb, rank=rank, world=world_size, progress=False)
        prepare_config(cfg, settings, require_tokenizer=world_size > 1)
        return data
