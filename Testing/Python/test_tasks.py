"""The one task list: aliases, parsing, head mapping (test_layering checks it imports without torch)."""

import pytest

from BrainIDLib import tasks
from BrainIDLib.errors import BrainIDError


def test_aliases_and_lists_parse_to_canonical_names_in_order():
    assert tasks.parse(["T1, seg", "super-resolution", "sr", "bias-corrected"]) == [
        "anatomy", "segmentation", "super_resolution", "bias_corrected"]
    assert tasks.parse("pca segmentation") == ["features_pca", "segmentation"]
    assert tasks.parse([]) == []


def test_unknown_or_disallowed_task_names_the_choices():
    with pytest.raises(BrainIDError, match="unknown task 'brain'.*segmentation"):
        tasks.parse(["brain"])
    with pytest.raises(BrainIDError, match="unknown task .pca.*bias_corrected$"):
        tasks.parse(["pca"], allowed=tasks.OUTPUT_TASKS)


def test_heads_for_maps_bias_correction_to_the_bias_head_and_skips_feature_views():
    assert tasks.heads_for(["bias_corrected", "features_pca", "bias_field", "anatomy"]) == ["bias_field", "anatomy"]


def test_every_task_has_a_display_name():
    assert set(tasks.ALL_TASKS) <= set(tasks.DISPLAY_NAMES)
