"""Is there a gap to close? The held-out loss of the start and of the teacher, no training.

    python -m benchmark.recovery.probe [methods=ti,lora,peqa] [seeds=8] [overrides of experiment=recovery]

For each method (one per teacher kind by default) and seed: the teacher, its base (fitted when
``recovery.fit_steps > 0``, as in a run) and the held-out images, then the held-out denoising
loss with the method's initial artifact (its state after ``setup``) and with the teacher.
Prints one CSV line per (method, seed) and a summary per method: the mean gap L_init -
L_teacher, its 95 % bootstrap CI over seeds, and how many seeds have a positive gap. A recovery
score is defined only where the gap is positive.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from benchmark import data
from benchmark.config import method_config
from benchmark.recovery.run import base_pipeline, prepare, recovery_config
from benchmark.recovery.teacher import heldout_loss, install
from benchmark.report.tables import bootstrap_ci
from benchmark.sweep.jobs import CONF_DIR
from methods.common.registry import method_class


def probe(method_name: str, seed: int, overrides: list[str]) -> tuple[float, float]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", ["experiment=recovery", f"method={method_name}", f"seed={seed}", *overrides])
    rc, method_cfg = recovery_config(cfg), method_config(cfg)
    subject = data.get_subject(cfg.subject, cfg.data)
    root = data.resolve_dataset_root(cfg.data.root, cfg.data.download, cfg.data.cache_dir)
    image_paths = data.subject_image_paths(root, subject)
    setting = prepare(cfg, rc, method_cfg, subject, image_paths, torch.device("cpu"))
    initial = {k: v.detach().clone() for k, v in setting.method.state_dict().items()}

    def loss_with(artifact):
        pipeline = base_pipeline(cfg, setting.base_key, "cpu", torch.float32)
        install(pipeline, method_class(method_name)(method_cfg), setting.kind, artifact)
        return heldout_loss(pipeline, setting.images["heldout"], setting.prompt, seed, rc)

    return loss_with(initial), loss_with(setting.teacher)


def main(argv: list[str]) -> int:
    options = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("methods", "seeds"))
    overrides = [a for a in argv if a.split("=", 1)[0] not in ("methods", "seeds")]
    print("method,seed,loss_initial,loss_teacher,gap")
    for name in options.get("methods", "ti,lora,peqa").split(","):
        gaps = []
        for seed in range(int(options.get("seeds", 8))):
            initial, teacher = probe(name, seed, overrides)
            gaps.append(initial - teacher)
            print(f"{name},{seed},{initial:.6f},{teacher:.6f},{initial - teacher:+.6f}", flush=True)
        low, high = bootstrap_ci([[g] for g in gaps])
        print(
            f"# {name}: gap mean {np.mean(gaps):+.6f} (95% CI {low:+.6f} .. {high:+.6f}), "
            f"positive in {sum(g > 0 for g in gaps)}/{len(gaps)} seeds",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
