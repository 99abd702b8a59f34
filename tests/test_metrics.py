"""benchmark/metrics.py with the tiny random models of conf/eval/smoke.yaml (nothing downloaded)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from benchmark.metrics import MetricModelsUnavailable, Scorer, mean_pairwise_cosine
from tests.tolerance import assert_close_up_to_reordering

os.environ["HF_HUB_OFFLINE"] = "1"  # conftest sets it too; nothing here may download
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def smoke_cfg():
    return OmegaConf.load(CONF_DIR / "eval" / "smoke.yaml")


@pytest.fixture(scope="module")
def scorer():
    cfg = smoke_cfg()
    cfg.batch_size = 2  # several batches per call
    return Scorer(cfg)


def synthetic_images(n: int, seed: int = 0, size: int = 48) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]


def test_mean_pairwise_cosine_by_hand():
    # a = [(1,0), (0,1)], b = [(1,0), (0.6,0.8)]: a.b^T = [[1, 0.6], [0, 0.8]]
    # all 4 pairs: (1 + 0.6 + 0 + 0.8) / 4 = 0.6
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert mean_pairwise_cosine(a, b) == pytest.approx(0.6)
    # b against itself without self pairs: the one pair b0.b1 = 0.6 (with self pairs: (1+0.6+0.6+1)/4 = 0.8)
    assert mean_pairwise_cosine(b, b, exclude_diagonal=True) == pytest.approx(0.6)
    assert mean_pairwise_cosine(b, b) == pytest.approx(0.8)


def test_features_are_unit_norm_and_batch_independent(scorer):
    images = synthetic_images(5)
    feats = scorer.clip_image_features(images)
    assert feats.shape[0] == 5
    assert torch.allclose(feats.norm(dim=-1), torch.ones(5), atol=1e-5)
    one_by_one = torch.cat([scorer.clip_image_features([im]) for im in images])
    assert_close_up_to_reordering(feats, one_by_one)
    text_feats = scorer.clip_text_features(["a dog", "a cat"])
    assert torch.allclose(text_feats.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_identical_images_score_one(scorer):
    image = synthetic_images(1, seed=1)[0]
    s = scorer.score([image] * 3, ["a dog"] * 3, [image] * 4)
    assert s.clip_i == pytest.approx(1.0, abs=1e-5)
    assert s.dino == pytest.approx(1.0, abs=1e-5)
    assert s.n_images == 3 and s.dino_inter is None
    assert -1.0 <= s.clip_t <= 1.0


def test_distinct_images_score_below_one(scorer):
    s = scorer.score(synthetic_images(3, seed=1), ["a dog"] * 3, synthetic_images(3, seed=2))
    assert s.clip_i < 1 - 1e-4 and s.dino < 1 - 1e-4


def test_permutations_do_not_change_scores(scorer):
    generated, real = synthetic_images(4, seed=3), synthetic_images(3, seed=4)
    texts = ["a dog in the jungle", "a dog on the beach", "a red dog", "a dog with a hat"]
    base = scorer.score(generated, texts, real)
    shuffled_real = scorer.score(generated, texts, [real[i] for i in (2, 0, 1)])
    order = [3, 1, 0, 2]
    shuffled_gen = scorer.score([generated[i] for i in order], [texts[i] for i in order], real)
    for s in (shuffled_real, shuffled_gen):
        assert s.clip_i == pytest.approx(base.clip_i, abs=1e-6)
        assert s.dino == pytest.approx(base.dino, abs=1e-6)
        assert s.clip_t == pytest.approx(base.clip_t, abs=1e-6)
    # pairing texts with the wrong images does change CLIP-T (it is not a set-to-set score)
    mispaired = scorer.score(generated, texts[::-1], real)
    assert mispaired.clip_t != pytest.approx(base.clip_t, abs=1e-6)


def test_clip_t_is_mean_of_matched_cosines(scorer):
    generated, texts = synthetic_images(3, seed=5), ["a dog", "a dog on the moon", "a sleeping dog"]
    img, txt = scorer.clip_image_features(generated), scorer.clip_text_features(texts)
    expected = sum(float(img[i] @ txt[i]) for i in range(3)) / 3
    assert scorer.score(generated, texts, generated).clip_t == pytest.approx(expected, abs=1e-6)


def test_dino_inter_excludes_self_pairs(scorer):
    group_a, group_b = synthetic_images(3, seed=6), synthetic_images(2, seed=7)
    s = scorer.score(group_a, ["a dog"] * 3, group_b, inter_groups=[group_a, group_b])

    def by_loop(group):
        f = scorer.dino_features(group)
        pairs = list(itertools.combinations(range(len(group)), 2))  # i < j, no self pairs
        return sum(float(f[i] @ f[j]) for i, j in pairs) / len(pairs)

    assert s.dino_inter == pytest.approx((by_loop(group_a) + by_loop(group_b)) / 2, abs=1e-6)
    assert s.dino_inter < 1 - 1e-4


def test_score_real_excludes_self_pairs(scorer):
    real = synthetic_images(3, seed=8)
    s = scorer.score_real(real)
    assert s.clip_t is None and s.n_images == 3
    assert s.clip_i < 1 - 1e-4 and s.dino < 1 - 1e-4  # self pairs would pull these towards 1
    f = scorer.dino_features(real)
    assert s.dino == pytest.approx(float(f[0] @ f[1] + f[0] @ f[2] + f[1] @ f[2]) / 3, abs=1e-6)


def test_real_dreambooth_images(scorer, dataset_root):
    real = [Image.open(p) for p in sorted((dataset_root / "dog6").iterdir())[:3]]
    s = scorer.score(real[:1], ["a dog"], real)
    assert s.n_images == 1 and 0 < s.clip_i < 1 + 1e-6


def test_random_models_are_seeded():
    images = synthetic_images(2, seed=9)
    a, b = Scorer(smoke_cfg()), Scorer(smoke_cfg())
    assert torch.equal(a.dino_features(images), b.dino_features(images))
    assert torch.equal(a.clip_image_features(images), b.clip_image_features(images))


@pytest.mark.parametrize("eval_name", ["zoodip", "dreambooth"])
@pytest.mark.parametrize("which", ["clip", "dino"])
def test_offline_real_weights_fail_fast(eval_name, which, monkeypatch):
    """Fast = no network attempt at all (no timeouts, no retries); no wall-clock assertion."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"network attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    cfg = OmegaConf.load(CONF_DIR / "eval" / f"{eval_name}.yaml")
    other = "dino" if which == "clip" else "clip"
    cfg[other] = smoke_cfg()[other]  # only the model under test needs weights
    with pytest.raises(MetricModelsUnavailable) as err:
        Scorer(cfg)
    message = str(err.value)
    assert "\n" not in message and f"eval.{which}.checkpoint=<file>" in message


def test_missing_checkpoint_file(tmp_path):
    cfg = smoke_cfg()
    cfg.dino = OmegaConf.load(CONF_DIR / "eval" / "dreambooth.yaml").dino
    cfg.dino.checkpoint = str(tmp_path / "nope.safetensors")
    with pytest.raises(MetricModelsUnavailable, match="eval.dino.checkpoint"):
        Scorer(cfg)


def test_timm_checkpoint_file_loads(tmp_path):
    """A local DINO checkpoint is what timm would fetch: ViT-S/16 random weights saved to a file."""
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    cfg = smoke_cfg()
    cfg.dino = OmegaConf.load(CONF_DIR / "eval" / "dreambooth.yaml").dino
    cfg.dino.checkpoint = str(tmp_path / "model.safetensors")
    scorer = Scorer(cfg)
    images = synthetic_images(2, seed=10, size=64)
    with torch.inference_mode():
        expected = source.eval()(torch.stack([scorer.dino_preprocess(im) for im in images]))
    got = scorer.dino_features(images)
    assert got.shape == (2, 384)
    assert torch.allclose(got, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)
