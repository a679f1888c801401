"""Segmentation clean-up: each structure keeps its largest connected piece; islands take their next
most probable class; the decision is mirror-symmetric; predict applies it unless told not to."""

import numpy as np
import torch

import BrainIDLib
from BrainIDLib.cleanup import keep_largest_components_
from BrainIDLib.samples import sample_path


def probabilities() -> torch.Tensor:
    """(3, 12, 12, 12): background 0, class 1 a big cube plus a one-voxel-gap island, class 2 a
    cube; inside class 1's island, class 2 is the runner-up, elsewhere background is."""
    p = torch.zeros(3, 12, 12, 12)
    p[0] = 1.0
    p[:, 1:6, 1:6, 1:6] = torch.tensor([0.1, 0.9, 0.0]).view(3, 1, 1, 1)  # main piece of class 1
    p[:, 8:10, 8:10, 8:10] = torch.tensor([0.1, 0.6, 0.3]).view(3, 1, 1, 1)  # island of class 1
    p[:, 7:11, 1:4, 1:4] = torch.tensor([0.2, 0.0, 0.8]).view(3, 1, 1, 1)  # class 2, one piece
    return p


def test_islands_take_their_runner_up_class_and_main_pieces_stay():
    p = probabilities()
    before = p.argmax(0)
    changed = keep_largest_components_(p, background=0)
    after = p.argmax(0)
    assert changed == 8
    assert bool((after[8:10, 8:10, 8:10] == 2).all())  # the island's runner-up
    island = torch.zeros_like(before, dtype=torch.bool)
    island[8:10, 8:10, 8:10] = True
    assert torch.equal(after[~island], before[~island])
    assert torch.allclose(p.sum(0), torch.ones(12, 12, 12))  # still probabilities
    assert p[1, 8, 8, 8] == 0


def test_diagonal_contact_joins_pieces_and_background_is_left_alone():
    p = torch.zeros(2, 6, 6, 6)
    p[0] = 1.0
    p[:, 1, 1, 1] = torch.tensor([0.0, 1.0]).view(2)
    p[:, 2, 2, 2] = torch.tensor([0.0, 1.0]).view(2)  # touches the first by a corner: one piece
    assert keep_largest_components_(p.clone(), background=0) == 0


def test_cleanup_commutes_with_a_left_right_mirror():
    torch.manual_seed(0)
    logits = torch.randn(4, 16, 10, 10) * 2
    a = logits.softmax(0)
    b = a.flip(1).clone()
    keep_largest_components_(a, background=0)
    keep_largest_components_(b, background=0)
    assert torch.equal(a.argmax(0), b.flip(1).argmax(0))


def test_predict_cleans_by_default_and_keeps_islands_when_asked():
    model = BrainIDLib.load_model("brainid-lite")
    from scipy import ndimage

    def pieces(seg):
        return sum(ndimage.label(seg == v, np.ones((3, 3, 3)))[1] for v in np.unique(seg) if v != 0)

    runs = {c: np.asarray(BrainIDLib.predict(str(sample_path()), model=model, device="cpu", cleanup=c,
                                             flip_average=False).outputs["segmentation"].dataobj) for c in (False, True)}
    assert pieces(runs[True]) < pieces(runs[False])
    agree = float((runs[True] == runs[False]).mean())
    assert 0.97 < agree < 1.0  # islands only: the bulk of the segmentation is untouched


def test_renormalising_slab_by_slab_changes_nothing(monkeypatch):
    """The changed voxels are renormalised a few slices at a time (bounded memory on whole heads): the
    result must equal doing them all at once, bit for bit, and every voxel must still sum to 1."""
    import BrainIDLib.cleanup as cleanup

    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(3 * torch.randn(6, 20, 18, 16, generator=g), 0)  # fragmented: many islands
    whole = probs.clone()
    assert keep_largest_components_(whole, 0) > 300
    monkeypatch.setattr(cleanup, "RENORMALISE_VALUES", 6 * 18 * 16 * 3)  # 3 slices per slab
    slabs = probs.clone()
    keep_largest_components_(slabs, 0)
    torch.testing.assert_close(slabs, whole, rtol=1e-6, atol=1e-7)
    assert torch.equal(slabs.argmax(0), whole.argmax(0))
    torch.testing.assert_close(slabs.sum(0), torch.ones(20, 18, 16))
