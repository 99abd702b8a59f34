"""Gradient-Free TI on the tiny model: CMA-ES lowers the loss with forward passes only, its
state survives a checkpoint, and the artifact is a diffusers textual-inversion file."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from benchmark import data, models
from benchmark.config import method_config
from benchmark.records import REQUIRED_FIELDS
from benchmark.run import run
from benchmark.train import step_generator
from methods.common import gfti_init
from methods.common.base import ConfigError
from methods.gfti import GradientFreeTI, permuted_lower, principal_directions, randomized_principal_directions


@pytest.fixture
def images(dataset_root):
    return data.load_images(data.subject_image_paths(dataset_root, data.get_subject("dog6")), 64)


@pytest.fixture
def make_method(tiny_cfg, images):
    def make(*overrides: str, protocol: str = "ours"):
        # fp32: CPU fp16 convolutions are several times slower (fp16, the default, runs in test_run_...)
        cfg = tiny_cfg(
            "method=gfti",
            "method.popsize=6",
            "method.precision=fp32",
            f"method.protocol={protocol}",
            *overrides,
        )
        components = models.load_components(cfg.model)
        method = GradientFreeTI(method_config(cfg))
        method.setup(components, data.get_subject("dog6"))
        method.precompute(images, 0, 1)
        return method, components, cfg

    return make


def generation(method, images, step, seed_step=None):
    generator = step_generator(0, step if seed_step is None else seed_step)
    index = torch.randint(len(images), (1,), generator=generator)
    return method.step({"pixel_values": images[index], "generator": generator, "index": index}, step)


def test_principal_directions_are_the_top_axes_of_the_rows():
    g = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    scales = torch.tensor([10.0, 5.0, 2.0, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    rows = (torch.randn(4000, 8, generator=g, dtype=torch.float64) * scales) @ rotation.T + 3.0
    basis = principal_directions(rows, 3)
    assert basis.shape == (3, 8)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3, dtype=torch.float64))
    assert torch.all((basis * rotation.T[:3]).sum(dim=1).abs() > 0.99)  # = the top 3 axes, up to sign


def spectrum_rows(scales: torch.Tensor, n: int = 3000) -> torch.Tensor:
    """n rows with axis standard deviations ``scales``, rotated, off-centre."""
    g = torch.Generator().manual_seed(1)
    d = len(scales)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ rotation.T + 0.5


def slow_spectrum_rows() -> torch.Tensor:
    """A slowly decaying spectrum: a randomized SVD's top-16 subspace is visibly inexact."""
    return spectrum_rows(torch.linspace(2.0, 1.0, 64, dtype=torch.float64))


def subspace_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of two orthonormal bases."""
    return torch.linalg.svdvals(a.double() @ b.double().T)


def test_randomized_pca_is_seeded_orthonormal_and_not_the_exact_subspace():
    rows = slow_spectrum_rows()
    basis = randomized_principal_directions(rows, 16, seed=3)
    torch.testing.assert_close(basis @ basis.T, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(basis, randomized_principal_directions(rows, 16, seed=3))
    assert not torch.equal(basis, randomized_principal_directions(rows, 16, seed=4))
    exact = subspace_cosines(basis, principal_directions(rows, 16))
    assert exact.min() < 0.99  # a slow spectrum: randomized SVD's subspace is not the exact one
    steep = spectrum_rows(torch.tensor([50.0, 40.0, 30.0] + [1.0] * 61, dtype=torch.float64))
    top = subspace_cosines(randomized_principal_directions(steep, 3, 0), principal_directions(steep, 3))
    assert top.min() > 1 - 1e-6  # a clear gap after 3 axes: the exact top 3


@pytest.mark.parametrize("shape", [(50, 8), (8, 8), (8, 12)], ids=["tall", "square", "wide"])
def test_permuted_lower_is_the_p_l_of_an_lu_factorization(shape):
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    m[:, -1] = m[:, 0]  # rank-deficient, as the power iteration's wide products are
    p, lower, _ = torch.linalg.lu(m)
    assert torch.equal(permuted_lower(m), p @ lower)


def test_randomized_pca_of_clips_vocabulary_needs_no_vocabulary_squared_matrix():
    """49408 x 768 (SD1.5's token table): a P of the LU in the power iteration would be 49408^2
    floats (9.8 GB); the sketches are 49408 x 266."""
    from benchmark.memory.tracker import tracking

    with tracking(fake=True) as tracker:
        tracker.reset_peaks()
        randomized_principal_directions(torch.empty(49408, 768), 256, seed=0)
    assert max(peak.bytes for peak in tracker.peaks.values()) < 2e9  # the table and its copies: 0.6 GB


def test_randomized_pca_is_sklearns_randomized_pca():
    """feizc's PCA(n_components=256) ran sklearn's randomized SVD; the oracle is sklearn's
    PCA(svd_solver="randomized") with the same random_state (sklearn: a test-time extra)."""
    from sklearn import decomposition

    rows = slow_spectrum_rows()
    ours = randomized_principal_directions(rows, 16, seed=3)
    pca = decomposition.PCA(16, svd_solver="randomized", random_state=3).fit(rows.float().numpy())
    theirs = torch.from_numpy(pca.components_).double()
    assert subspace_cosines(ours, theirs).min() > 1 - 1e-5  # fp32 sums in another order
    rowwise = (ours * theirs).sum(dim=1).abs()  # the same axes, one by one, up to sign
    assert rowwise.min() > 1 - 1e-5
    assert subspace_cosines(ours, principal_directions(rows, 16)).min() < 0.99


@pytest.mark.parametrize("solver", ["randomized", "exact"])
def test_setup_takes_the_basis_from_the_chosen_pca_solver(tiny_cfg, solver):
    cfg = tiny_cfg(
        "method=gfti", "method.init=initializer", "method.precision=fp32", f"method.pca_solver={solver}"
    )
    components = models.load_components(cfg.model)
    vocabulary = components.text_encoder.get_input_embeddings().weight.detach().clone()
    method = GradientFreeTI(method_config(cfg))
    method.setup(components, data.get_subject("dog6"))
    if solver == "randomized":
        assert method_config(tiny_cfg("method=gfti")).pca_solver == "randomized"  # the default
        expected = randomized_principal_directions(vocabulary, 32, seed=0)
    else:
        expected = principal_directions(vocabulary, 32)
    assert torch.equal(method.basis, expected)


def test_cma_es_lowers_the_loss_on_a_fixed_batch(make_method, images):
    # every generation sees the same image, timestep, noise and prompt: a fixed objective
    method, components, _ = make_method()
    assert method.subspace_dim == 32  # min(256, the tiny model's embedding dim)
    first = generation(method, images, 0, seed_step=0)
    for step in range(1, 5):
        last = generation(method, images, step, seed_step=0)
    assert last["loss"] < first["loss"] and last["best_loss"] <= first["best_loss"]
    assert method.record_extras()["forward_passes_per_step"] == 6
    for name in ("unet", "vae", "text_encoder"):
        assert all(p.grad is None and not p.requires_grad for p in getattr(components, name).parameters())


@pytest.mark.parametrize("protocol", ["ours", "official"])
def test_cma_state_survives_checkpoint_and_restore(make_method, images, protocol):
    settings = ("method.popsize=3", "method.repeats=1")
    straight, _, _ = make_method(*settings, protocol=protocol)
    for step in range(2):
        generation(straight, images, step)
    first, _, _ = make_method(*settings, protocol=protocol)
    generation(first, images, 0)
    buffer = io.BytesIO()
    torch.save(first.checkpoint(), buffer)  # what benchmark.train writes
    buffer.seek(0)
    resumed, _, _ = make_method(*settings, protocol=protocol)
    resumed.restore(torch.load(buffer, weights_only=False))
    assert torch.equal(resumed.state_dict()["<sks>"], first.state_dict()["<sks>"])
    generation(resumed, images, 1)
    assert (resumed.es.mean == straight.es.mean).all() and resumed.es.sigma == straight.es.sigma
    assert torch.equal(resumed.state_dict()["<sks>"], straight.state_dict()["<sks>"])


def test_official_protocol_scores_all_images_x_repeats_with_fresh_noise_and_shared_timesteps(
    make_method, images
):
    method, components, _ = make_method("method.popsize=2", "method.repeats=2", protocol="official")
    calls = []
    components.unet.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].clone(), args[1].clone())), with_kwargs=False
    )
    generation(method, images, 0)
    n = len(images)
    assert sum(sample.shape[0] for sample, _ in calls) == 2 * n * 2 == method.forward_passes_per_step()
    per_candidate = len(calls) // 2
    assert all(torch.equal(t, calls[0][1][: len(t)]) for _, t in calls)  # one timestep per position
    first, second = calls[0][0], calls[per_candidate][0]  # the two candidates' first batches
    assert first.shape == second.shape and not torch.equal(first, second)  # fresh draws per candidate


def test_official_protocol_keeps_the_best_candidate_of_the_last_generation(make_method, images, tiny_cfg):
    # popsize 4: CMA-ES recombines the best 2, so its mean differs from the best candidate
    method, components, cfg = make_method("method.popsize=4", "method.repeats=1", protocol="official")
    told = []
    tell = method.es.tell
    method.es.tell = lambda candidates, losses: (told.append((candidates, losses)), tell(candidates, losses))[
        1
    ]
    for step in range(2):
        generation(method, images, step)
    candidates, losses = told[-1]
    best = method.token_from(candidates[int(np.argmin(losses))]).to(components.text_encoder.dtype)
    assert torch.equal(method.state_dict()["<sks>"][0], best)
    assert not torch.equal(best, method.token_from(method.es.mean).to(best.dtype))  # not the CMA-ES mean
    vocabulary = models.load_components(cfg.model).text_encoder.get_input_embeddings().weight.double()
    torch.testing.assert_close(method.offset, vocabulary.mean(dim=0))  # PCA.inverse_transform's mean


def _image(pipeline, prompt):
    out = pipeline(
        prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    return torch.from_numpy(out.images[0])


def test_artifact_is_a_diffusers_token_file_that_changes_the_output(make_method, images, tmp_path):
    method, _, cfg = make_method()
    initial = method.state_dict()["<sks>"].clone()
    generation(method, images, 0)
    artifact = load_file(str(method.save_artifact(tmp_path)))
    assert list(artifact) == ["<sks>"] and artifact["<sks>"].shape == (1, 32)
    assert not torch.equal(artifact["<sks>"], initial)
    trained, untrained = models.load_pipeline(cfg.model), models.load_pipeline(cfg.model)
    GradientFreeTI(method.cfg).apply(trained, artifact)
    GradientFreeTI(method.cfg).apply(untrained, {"<sks>": initial})
    row = trained.tokenizer.convert_tokens_to_ids("<sks>")
    assert torch.equal(trained.text_encoder.get_input_embeddings().weight[row], artifact["<sks>"][0])
    assert not torch.allclose(_image(trained, "a photo of <sks>"), _image(untrained, "a photo of <sks>"))


@pytest.mark.parametrize(
    "override",
    [
        "method.popsize=1",
        "method.sigma=0",
        "method.subspace_dim=0",
        "method.quantize=int3",
        "method.T_U=2000",
        "method.precision=fp8",
        "method.protocol=feizc",
        "method.repeats=0",
        "method.init=mean",
        "method.pca_solver=arpack",
    ],
)
def test_bad_settings_are_config_errors(tiny_cfg, override):
    with pytest.raises(ConfigError):
        method_config(tiny_cfg("method=gfti", override))


@pytest.mark.integration
def test_run_writes_a_complete_record(tiny_cfg):
    record = run(
        tiny_cfg("method=gfti", "subject=dog6", "method.popsize=2", "method.repeats=1", "train.max_steps=2")
    )
    assert set(REQUIRED_FIELDS) <= set(record) and record["status"] == "ok"
    assert record["method.protocol"] == "official"  # the default: Table 1's protocol
    assert record["train_steps"] == 2 and record["forward_passes_per_step"] == 2 * 5  # x 5 dog6 images
    assert record["subspace_dim"] == 32 and record["trainable_params"] == 32
    assert record["method.init"] == "cross_attention" and record["method.init_clip"] == ["random"]
    assert record["initial_token_norm"] == pytest.approx(1, abs=1e-6)  # feizc's unit-norm e0
    assert record["cma_evaluations"] == 2 * 2  # generations x popsize: feizc's --budget counts these
    assert record["clip_i"] is not None and record["artifact_bytes"] > 0


def test_init_lists_are_feizcs(monkeypatch):
    monkeypatch.undo()  # the full lists, not conftest's first 8 names
    names, templates = gfti_init.imagenet_classes()
    # feizc utils.py: automatic_subjective_classnames (1,000, duplicates kept), imagenet_template (80)
    assert len(names) == 1000 and names.count("sunglasses") == 2 and names[21] == "kite (bird of prey)"
    assert names[0] == "tench" and names[-1] == "toilet paper"
    assert len(templates) == 80 and templates[0]("X") == "a bad photo of a X."
    assert templates[-1]("X") == "a tattoo of the X."


def feizc_initialize(tokenizer, text_features, image_features, table, names, templates):
    """A transcription of feizc's initialize_inversion.py (embedding_generate, then
    image_condition_embed_initialize): per class, 77-token padding, images one by one."""
    sentence_weights, token_weights = [], []
    for name in names:
        texts = [template(name) for template in templates]
        ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        class_embedding = F.normalize(text_features(ids), dim=-1).mean(dim=0)
        sentence_weights.append(class_embedding / class_embedding.norm())
        token_ids = tokenizer.encode(name, add_special_tokens=False)
        token_weights.append(torch.stack([table[i] for i in token_ids]).mean(dim=0))
    sentence_weights, token_weights = torch.stack(sentence_weights, dim=1), torch.stack(token_weights)
    inversions = []
    for features in image_features:
        attention = torch.softmax(features[None] @ sentence_weights, dim=-1)
        inversions.append(attention @ token_weights)
    final = torch.stack(inversions).mean(dim=0)
    return (final / final.norm())[0]


def test_cross_attention_init_matches_feizcs_code(tiny_cfg, images):
    components = models.load_components(tiny_cfg().model)
    tokenizer, encoder = components.tokenizer, components.text_encoder
    keys = gfti_init.class_keys(tokenizer, encoder, gfti_init.RANDOM)
    ours = gfti_init.cross_attention_token(keys, images)
    text_features, image_tower, size = gfti_init._clip_towers(gfti_init.RANDOM, encoder, seed=0)
    with torch.no_grad():
        queries = F.normalize(image_tower(gfti_init.clip_pixels(images, size)), dim=-1)
        names, templates = gfti_init.imagenet_classes()
        table = encoder.get_input_embeddings().weight
        reference = feizc_initialize(tokenizer, text_features, queries, table, names, templates)
    assert len(names) == 8 and len(queries) == len(images) == 5
    assert ours.norm() == pytest.approx(1, abs=1e-6)
    # fp32 sums in another order (77 vs longest padding, batched vs per image): ~1e-7 apart
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    # the source: with one class, the softmax is 1 and e0 is that name's token embedding, normalized
    names_one = (["golden retriever"], templates)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gfti_init, "imagenet_classes", lambda: names_one)
        alone = gfti_init.cross_attention_token(gfti_init.class_keys(tokenizer, encoder, "random"), images)
    rows = table[tokenizer.encode("golden retriever", add_special_tokens=False)].detach().mean(dim=0)
    torch.testing.assert_close(alone, rows / rows.norm(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("protocol", ["official", "ours"])
def test_the_search_starts_at_the_cross_attention_token(make_method, protocol):
    method, components, cfg = make_method("method.init=cross_attention", protocol=protocol)
    e0 = method.initial_token
    assert e0.norm() == pytest.approx(1, abs=1e-6)
    class_noun = make_method("method.init=initializer", protocol=protocol)[0].initial_token
    assert not torch.allclose(e0, class_noun)
    start = method.state_dict()["<sks>"][0].double()  # the token before step 0: x = 0
    expected = e0 + method.offset  # official: PCA.inverse_transform adds the vocabulary mean
    torch.testing.assert_close(start, expected.float().double(), rtol=0, atol=0)
    assert protocol == "official" or torch.equal(method.offset, torch.zeros_like(method.offset))


def test_cross_attention_init_needs_a_clip_per_text_encoder(tiny_cfg):
    with pytest.raises(ConfigError, match="model.text_encoder_clip"):
        method_config(tiny_cfg("method=gfti", "model.text_encoder_clip=null"))
    assert method_config(tiny_cfg("method=gfti", "model.text_encoder_clip=null", "method.init=initializer"))


def test_table1_runs_gfti_with_feizcs_protocol_init_and_the_papers_evaluations(tmp_path):
    from benchmark.sweep.plan import plan_sweep

    args = ["experiment=table1", "method=gfti", "subject=dog6", f"paths.results={tmp_path}"]
    (planned,) = plan_sweep(args)
    assert planned.value("method.protocol") == "official"
    assert planned.value("method.init") == "cross_attention"
    assert planned.value("method.init_clip") == ["openai/clip-vit-large-patch14"]  # feizc's ./clip for SD1.5
    assert planned.value("method.steps") * planned.value("method.popsize") == 13_000  # ZOODiP's GF-TI row


def test_a_missing_init_clip_is_refused_before_training_with_one_line(tiny_cfg, monkeypatch, tmp_path):
    import huggingface_hub.constants

    from benchmark.schema import validate

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(models.WeightsUnavailable) as err:
        validate(tiny_cfg("method=gfti", "model.text_encoder_clip=[zo-bench-tests/no-such-clip]"))
    message = str(err.value)
    assert "\n" not in message and "zo-bench-tests/no-such-clip" in message
    assert "method.init=initializer" in message  # says what to do
    (tmp_path / "clip").mkdir()  # a folder without config.json
    with pytest.raises(models.WeightsUnavailable, match="config.json"):
        validate(tiny_cfg("method=gfti", f"model.text_encoder_clip=[{tmp_path / 'clip'}]"))
    with pytest.raises(ConfigError, match="give one per encoder"):  # SD1: one text encoder
        validate(tiny_cfg("method=gfti", "model.text_encoder_clip=[random,random]"))


class OnGpu(torch.Tensor):
    """A tensor as a checkpoint loaded onto a GPU holds it: numpy() refuses, cpu() copies it out."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def test_restore_from_a_checkpoint_whose_tensors_are_on_the_gpu(make_method, images):
    first, _, _ = make_method("method.popsize=3", "method.repeats=1", protocol="official")
    generation(first, images, 0)
    state = {
        k: v.as_subclass(OnGpu) if isinstance(v, torch.Tensor) else v for k, v in first.checkpoint().items()
    }
    with pytest.raises(TypeError, match="cuda"):
        state["best_x"].numpy()
    resumed, _, _ = make_method("method.popsize=3", "method.repeats=1", protocol="official")
    resumed.restore(state)
    assert torch.equal(resumed.state_dict()["<sks>"], first.state_dict()["<sks>"])
