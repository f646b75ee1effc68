"""Style augmentation (train.augment: style): seeded, background kept, strokes thickened or thinned, any layout."""

from __future__ import annotations

import pytest
import torch

from components.augment import style_jitter


def _glyph(bright_ink: bool) -> torch.Tensor:
    x = torch.full((1, 1, 32, 32), -1.0 if bright_ink else 1.0)
    x[0, 0, 8:24, 15:17] = 1.0 if bright_ink else -1.0  # a vertical stroke, 2 px wide
    x[0, 0, 15:17, 8:24] = 1.0 if bright_ink else -1.0  # and a horizontal one
    return x


def test_same_seed_same_batch_and_each_image_gets_its_own_draw() -> None:
    x = _glyph(True).repeat(8, 1, 1, 1)
    a = style_jitter(x, torch.Generator().manual_seed(3))
    b = style_jitter(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert len({tuple(img.flatten().tolist()) for img in a}) == 8  # eight different maps of one image
    assert not torch.equal(a, style_jitter(x, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("bright_ink", [True, False])
def test_the_background_is_kept_and_the_ink_changes_width(bright_ink: bool) -> None:
    x = _glyph(bright_ink).repeat(64, 1, 1, 1)
    y = style_jitter(x, torch.Generator().manual_seed(0))
    bg = -1.0 if bright_ink else 1.0
    assert torch.allclose(y[:, :, 0, :], torch.full_like(y[:, :, 0, :], bg), atol=1e-5)  # uncovered border: background
    ink = ((y - bg).abs() > 1.0).flatten(1).sum(1).float()  # pixels nearer the ink than the background
    before = float(((x[0] - bg).abs() > 1.0).sum())
    assert ink.max() > 1.5 * before and ink.min() < 0.75 * before  # dilated and eroded strokes both occur
    assert y.min() >= -1.0 - 1e-5 and y.max() <= 1.0 + 1e-5  # no value outside the input's range


def test_channels_last_input_gives_the_same_images() -> None:
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    a = style_jitter(x, torch.Generator().manual_seed(1))
    b = style_jitter(x.permute(0, 2, 3, 1), torch.Generator().manual_seed(1), layout="nhwc")
    assert torch.allclose(a, b.permute(0, 3, 1, 2), atol=1e-6)
    with pytest.raises(ValueError, match="expects a batch"):
        style_jitter(x[0], torch.Generator())
