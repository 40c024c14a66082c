"""The pipeline settings that bench/bench.py's runs and bench/record.py's --set take (no processes)."""
from __future__ import annotations

import argparse

import pytest

from bench import record
from bench.common import PIPELINE_SWITCHES, pipeline_switches


def test_pipeline_switches_write_the_worker_options_and_refuse_others():
    assert pipeline_switches(compile_blocks=False, transformer_graphs=0, segmenter_graphs=None) == [
        "--compile_blocks", "0", "--transformer_graphs", "0"]
    assert pipeline_switches(compile_blocks="true", attention_backend="flash") == [
        "--compile_blocks", "1", "--attention_backend", "flash"]
    assert set(PIPELINE_SWITCHES) == {"segmenter_graphs", "transformer_graphs", "attention_backend", "compile_blocks",
                                      "compile_vae"}
    from pipeline.run.config import PipelineConfig
    assert set(PIPELINE_SWITCHES) <= set(PipelineConfig.__dataclass_fields__)
    with pytest.raises(ValueError, match="^not a pipeline switch of bench.py: num_stages$"):
        pipeline_switches(num_stages=2)


def test_record_set_takes_pipeline_switches_only(tmp_path):
    def args(*items):
        return argparse.Namespace(tasks=3, images=100, steps=4, classes=[10], layouts=["1x1"], data=None,
                                  workdir=str(tmp_path / "w"), tag=None, set=list(items))
    assert record.argument_error(args("pipeline.compile_blocks=false", "pipeline.transformer_graphs=0")) is None
    assert record.settings(args("pipeline.compile_blocks=false")) == {"pipeline.compile_blocks": "false"}
    expected = ("--set {}: KEY=VALUE with KEY one of pipeline.segmenter_graphs, pipeline.transformer_graphs, "
                "pipeline.attention_backend, pipeline.compile_blocks, pipeline.compile_vae")
    for bad in ("pipeline.num_stages=2", "compile_blocks=false", "pipeline.compile_blocks"):
        assert record.argument_error(args(bad)) == expected.format(bad)


def test_segmenter_compile_measures_the_eager_segmenter_and_compares_gradients():
    """bench/segmenter_compile.py on a CPU (a tiny SegFormer, eager only: compiling is a GPU measurement)."""
    import torch

    from bench.segmenter_compile import agreement, measure
    row, grads = measure("eager", torch.device("cpu"), tiny=True, shapes=2, repeats=1)
    assert set(row) == {"first_s_128x171", "first_s_128x192", "ms_median", "ms_is"} and row["ms_is"] == "wall time"
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)
    assert agreement(grads, grads) == {"grad_rel_median": 0.0, "grad_rel_max": 0.0}
    shifted = [g * 1.01 for g in grads]
    shifted[0] = grads[0] + 1.0  # a large error on one tensor: the maximum, not the median
    result = agreement(shifted, grads)
    assert result["grad_rel_median"] == pytest.approx(0.01, rel=1e-4) and result["grad_rel_max"] > 0.01


def test_attention_backends_compares_each_block_form_with_float32():
    """bench/attention_backends.py on a CPU (tiny widths, eager: cuDNN and compiling are GPU measurements)."""
    import torch

    from bench.attention_backends import block_gradients
    from models.architectures import SD3_MEDIUM_TRANSFORMER
    config = dict(SD3_MEDIUM_TRANSFORMER, sample_size=8, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8)
    out = block_gradients(config, torch.device("cpu"), compile_blocks=False)
    assert list(out) == ["eager, torch's order", "eager, flash"]
    for path in out.values():
        assert [row["form"] for row in path["vs float32 math (relative)"]] == ["last block", "middle block"]
        for row in path["vs float32 math (relative)"]:  # bf16 autocast against float32: small, not zero
            assert all(0 < e < 0.05 for e in row["inputs h,e,t"]) and 0 < row["params median"] <= row["params max"] < 0.1
        assert any("flash_attention" in k for k in path["attention kernels"])
