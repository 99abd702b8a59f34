"""Which images a step sees (methods.common.sampling): shuffled epochs cover every image once, flips
come at the configured rate and really mirror the pixels, and every draw is a function of
(seed, step) alone, so a resumed run sees the same batches."""

from __future__ import annotations

import pytest
import torch

from benchmark.train import step_generator, train
from methods.common.base import DataConfig, Method, MethodConfig
from methods.common.sampling import batch_pixels, draw_images, epoch_order, training_batch


def draws(data: DataConfig, steps: int, n_images: int, batch_size: int = 1, seed: int = 0):
    return [draw_images(data, seed, s, n_images, batch_size, step_generator(seed, s)) for s in range(steps)]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_each_epoch_covers_every_image_once(batch_size):
    n = 5
    picked = torch.cat([d.image_index for d in draws(DataConfig(), 4 * n, n, batch_size)])
    epochs = picked[: (len(picked) // n) * n].view(-1, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert len({tuple(e.tolist()) for e in epochs}) > 1  # reshuffled, not one fixed order


def test_an_epoch_of_repeats_holds_each_image_repeats_times():
    order = epoch_order(seed=0, epoch=0, n_images=5, repeats=100)
    assert torch.bincount(order, minlength=5).tolist() == [100] * 5
    assert not torch.equal(order[:5], order[5:10])  # repeats are shuffled together, not in blocks


def test_replacement_draws_from_the_step_generator_as_before():
    for step, d in enumerate(draws(DataConfig(sampling="replacement"), 20, 5)):
        assert torch.equal(d.image_index, torch.randint(5, (1,), generator=step_generator(0, step)))


@pytest.mark.parametrize("flip_p", [0.0, 0.3, 0.5, 1.0])
def test_flip_frequency(flip_p):
    n_draws = 4000
    flipped = torch.cat([d.flipped for d in draws(DataConfig(flip_p=flip_p), n_draws // 4, 5, 4)])
    rate = flipped.float().mean().item()
    sigma = (flip_p * (1 - flip_p) / n_draws) ** 0.5  # binomial: 4.5 sigma is a 1-in-150,000 miss
    assert abs(rate - flip_p) <= 4.5 * sigma


def test_flipped_pixels_are_the_mirrored_image():
    images = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    data = DataConfig(flip_p=0.5)
    seen_flip = seen_plain = False
    for step in range(20):
        batch = training_batch(images, data, 0, step, 2, step_generator(0, step))
        for pixels, index, flipped in zip(batch["pixel_values"], batch["image_index"], batch["flipped"]):
            expected = images[index].flip(-1) if flipped else images[index]
            assert torch.equal(pixels, expected)
            seen_flip, seen_plain = seen_flip or bool(flipped), seen_plain or not flipped
    assert seen_flip and seen_plain


def test_draws_do_not_consume_the_step_generator_in_epoch_mode():
    g = step_generator(0, 7)
    draw_images(DataConfig(flip_p=0.5), 0, 7, 5, 2, g)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=step_generator(0, 7)))


def test_draws_depend_on_seed_and_step_only():
    data = DataConfig(flip_p=0.5, repeats=3)
    sequence = draws(data, 30, 5, 2, seed=4)
    step = 23  # alone, as a resumed run would draw it
    alone = draw_images(data, 4, step, 5, 2, step_generator(4, step))
    assert torch.equal(alone.image_index, sequence[step].image_index)
    assert torch.equal(alone.flipped, sequence[step].flipped)
    other_seed = draws(data, 30, 5, 2, seed=5)
    assert any(not torch.equal(a.image_index, b.image_index) for a, b in zip(sequence, other_seed))
    pixels = batch_pixels(torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2), sequence[0])
    assert pixels[:, 0, 0, 0].tolist() == sequence[0].image_index.float().tolist()


class _Recorder(Method):
    """Records the batches it is given; its state is how many it saw."""

    name = "recorder"

    def __init__(self, data: DataConfig, crash_at: int | None = None):
        super().__init__(MethodConfig(name="recorder", steps=12, lr=0.0, data=data))
        self.seen = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
        self.batches: list[tuple] = []
        self.crash_at = crash_at

    def setup(self, components, subject):
        pass

    def step(self, batch, step):
        if step == self.crash_at:
            raise KeyboardInterrupt  # as a kill: no checkpoint of this step
        pixels = batch["pixel_values"].sum().item()
        self.batches.append((step, batch["image_index"].tolist(), batch["flipped"].tolist(), pixels))
        with torch.no_grad():
            self.seen += 1
        return {"loss": torch.zeros(())}

    def trainable_parameters(self):
        return {"seen": self.seen}

    def state_dict(self):
        return {"seen": self.seen.detach()}

    def apply(self, pipeline, artifact):
        pass

    def subject_phrase(self, subject):
        return "sks"


def test_a_resumed_run_sees_the_same_batches(tmp_path):
    images = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    data = DataConfig(flip_p=0.5, repeats=2)
    straight = _Recorder(data)
    train(straight, images, 12, 2, 3, tmp_path / "straight", torch.device("cpu"), progress=False)
    first = _Recorder(data, crash_at=7)  # checkpoint after step 5, killed in step 7
    with pytest.raises(KeyboardInterrupt):
        train(first, images, 12, 2, 3, tmp_path / "resumed", torch.device("cpu"), checkpoint_every=5,
              progress=False)  # fmt: skip
    resumed = _Recorder(data)
    result = train(resumed, images, 12, 2, 3, tmp_path / "resumed", torch.device("cpu"), progress=False)
    assert result.resumed_from == 5
    assert resumed.batches == straight.batches[5:]
    assert float(resumed.seen) == 12
