"""SD3 variants through the pipeline layers, and per-stage loading from sharded checkpoints."""
from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from models.sd3 import TransformerParts
from models.tiny import make_tiny_sd3
from pipeline.dusa.layers import JointBlock, SD3Embed, SD3Head, pack, unpack

# Tiny configs of the published variants: SD3-medium (plain joint blocks), SD3.5-medium (dual
# attention in the first blocks, RMS q/k norm), SD3.5-large (RMS q/k norm, deeper).
VARIANTS = {
    "sd3-medium": dict(num_layers=3),
    "sd3.5-medium": dict(num_layers=4, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "sd3.5-large": dict(num_layers=6, qk_norm="rms_norm"),
}


def shard(tmp_path, **kwargs):
    """A tiny SD3 folder whose transformer is saved in many small safetensors shards."""
    folder = make_tiny_sd3(tmp_path / "sd3", **kwargs)
    model = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    model.save_pretrained(folder / "transformer", max_shard_size="40KB")
    return folder, model


@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_layers_equal_the_unsplit_transformer(tmp_path, variant):
    folder, reference = shard(tmp_path, **VARIANTS[variant])
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 3
    parts = TransformerParts(str(folder))
    g = torch.Generator().manual_seed(1)
    n, num_classes, tokens = 3, 5, 7
    prompt = torch.randn(num_classes, tokens, reference.config.joint_attention_dim, generator=g)
    pooled = torch.randn(num_classes, reference.config.pooled_projection_dim, generator=g)
    x_t = torch.randn(1, 16, 8, 8, generator=g)
    timestep = torch.tensor([370.0])
    classes = torch.tensor([0, 2, 4])
    mask = torch.ones(8, 8, dtype=torch.uint8)
    logits, target = torch.randn(num_classes, 8, 8, generator=g), torch.randn(16, 8, 8, generator=g)

    layers = [SD3Embed(parts.load("pos_embed"), parts.load("time_text_embed"), parts.load("context_embedder"),
                       prompt, pooled)]
    layers += [JointBlock(parts.load(f"transformer_blocks.{i}")) for i in range(parts.num_blocks)]
    layers.append(SD3Head(parts.load("norm_out"), parts.load("proj_out"), parts.config["patch_size"],
                          parts.out_channels))
    with torch.no_grad():
        acts = pack(x_t, timestep, logits, classes, mask, target, torch.ones(1))
        for layer in layers:
            acts = layer(acts)
        velocity = unpack(acts)[0]  # no grad here: packed as its bit-view
        expected = reference(hidden_states=x_t.expand(n, -1, -1, -1), encoder_hidden_states=prompt[classes],
                             pooled_projections=pooled[classes], timestep=timestep.expand(n)).sample
    torch.testing.assert_close(velocity, expected, rtol=1e-5, atol=1e-6)
    # Everything of the checkpoint was read, each tensor once.
    assert sorted(parts.loaded_keys) == sorted(reference.state_dict())


def test_a_block_reads_only_its_own_tensors(tmp_path):
    folder, reference = shard(tmp_path, num_layers=4)
    parts = TransformerParts(str(folder))
    block = parts.load("transformer_blocks.2")
    expected = {k for k in reference.state_dict() if k.startswith("transformer_blocks.2.")}
    assert set(parts.loaded_keys) == expected and len(parts.loaded_keys) == len(expected)
    for name, tensor in block.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[f"transformer_blocks.2.{name}"])
    # No other block was materialised: they stay shapes on the meta device.
    assert all(p.is_meta for p in parts._skeleton.transformer_blocks[1].parameters())


def test_loading_in_bf16_and_clear_errors(tmp_path):
    folder, _ = shard(tmp_path, num_layers=2)
    assert TransformerParts(str(folder), torch.bfloat16).load("proj_out").weight.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="no transformer/ folder in it"):
        TransformerParts(str(tmp_path / "sd3" / "vae"))
    for f in (folder / "transformer").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        TransformerParts(str(folder))


def test_a_compiled_joint_block_equals_the_eager_block_for_every_class_count(tmp_path):
    """pipeline.compile_blocks: the block through torch.compile (here its `aot_eager` backend, which needs no
    compiler on the CPU; the runs use inductor) computes what the eager block computes, with the class count
    a dynamic dimension (2, 5 and the specialised 1)."""
    import copy
    make_tiny_sd3(tmp_path / "sd3", num_layers=2)
    block = TransformerParts(str(tmp_path / "sd3")).load("transformer_blocks.0")
    eager, compiled = JointBlock(copy.deepcopy(block)), JointBlock(copy.deepcopy(block), compile_backend="aot_eager")
    torch._dynamo.reset()
    for n in (2, 5, 1):
        g = torch.Generator().manual_seed(n)
        inputs = [torch.randn(n, 64, 16, generator=g), torch.randn(n, 12, 16, generator=g), torch.randn(n, 16, generator=g)]
        outs = []
        for layer in (eager, compiled):
            leaves = [t.clone().requires_grad_(True) for t in inputs]
            out = unpack(layer(pack(*leaves)))
            (out[0].square().mean() + out[1].square().mean()).backward()
            outs.append((out, [t.grad for t in leaves], [p.grad.clone() for p in layer.parameters()]))
            layer.zero_grad()
        (a, ga, pa), (b, gb, pb) = outs
        for x, y in zip([*a, *ga, *pa], [*b, *gb, *pb]):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


def test_attention_backend_order_and_a_block_that_prefers_one(tmp_path):
    """pipeline.attention_backend: the named SDPA backend first, every other kept as a fallback; on the CPU
    (flash and math only) a block that prefers cuDNN computes bit for bit what the default block computes."""
    from torch.nn.attention import SDPBackend
    from pipeline.dusa.layers import ATTENTION_BACKENDS, attention_order
    order = attention_order("cudnn")
    assert order[0] == SDPBackend.CUDNN_ATTENTION and sorted(order, key=str) == sorted(ATTENTION_BACKENDS.values(),
                                                                                       key=str)
    assert attention_order("math")[0] == SDPBackend.MATH and attention_order("default") is None
    from pipeline.run.config import PipelineConfig
    assert PipelineConfig().attention_backend == "default"  # torch's own order, as the reference runs
    with pytest.raises(ValueError, match="^pipeline.attention_backend 'fast': one of cudnn, flash, efficient, math, "
                                         "default$"):
        attention_order("fast")
    make_tiny_sd3(tmp_path / "sd3", num_layers=2)
    block = TransformerParts(str(tmp_path / "sd3")).load("transformer_blocks.0")
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 64, 16, generator=g), torch.randn(3, 12, 16, generator=g), torch.randn(3, 16, generator=g)]
    outs = []
    for layer in (JointBlock(block), JointBlock(block, attention=order)):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = unpack(layer(pack(*leaves)))
        (out[0].square().mean() + out[1].square().mean()).backward()
        outs.append([*out, *(t.grad for t in leaves), *(p.grad.clone() for p in layer.parameters())])
        layer.zero_grad()
    assert all(torch.equal(x, y) for x, y in zip(*outs))


def test_a_compiled_block_keeps_its_attention_order_inside_the_compiled_code(tmp_path):
    """With pipeline.attention_backend set, the order is part of what torch.compile traces (dynamo's guards and
    the compile caches ignore SDPA's settings around a call); blocks of one form share one compiled graph, and
    it computes what the eager block under the same order computes. torch's own order compiles the block as is."""
    import copy
    from pipeline.dusa.layers import attention_order
    make_tiny_sd3(tmp_path / "sd3", num_layers=3)
    parts = TransformerParts(str(tmp_path / "sd3"))
    blocks = [parts.load(f"transformer_blocks.{i}") for i in range(2)]  # two of the same form
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(3, 64, 16, generator=g), torch.randn(3, 12, 16, generator=g), torch.randn(3, 16, generator=g)]
    for attention, traced in ((attention_order("math"), "_sdpa_kernel"), (None, None)):
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm.code)
            return gm.forward
        torch._dynamo.reset()
        eager = [JointBlock(copy.deepcopy(b), attention=attention) for b in blocks]
        compiled = [JointBlock(copy.deepcopy(b), compile_backend=backend, attention=attention) for b in blocks]
        outs = []
        for layers in (eager, compiled):
            acts = pack(*(t.clone().requires_grad_(True) for t in x))  # (as the blocks' outputs: one guard)
            for layer in layers:
                acts = layer(acts)
            outs.append(unpack(acts)[:2])
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
        assert len(graphs) == 1  # one compile for both blocks
        if traced:
            assert traced in graphs[0] and graphs[0].index("'MATH'") < graphs[0].index("scaled_dot_product_attention")
        else:
            assert "_sdpa_kernel" not in graphs[0] and "scaled_dot_product_attention" in graphs[0]


def test_a_block_that_cannot_be_compiled_runs_eagerly_and_the_others_skip_the_attempt(tmp_path, monkeypatch):
    """A compiler failure (no Triton or C compiler on a node) is said in one warning, and every joint block
    then computes eagerly what it would have computed, without trying again."""
    import copy
    make_tiny_sd3(tmp_path / "sd3", num_layers=2)
    parts = TransformerParts(str(tmp_path / "sd3"))
    attempts = []

    def broken_backend(gm, example_inputs):
        attempts.append(gm)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(JointBlock, "compile_failure", None)
    torch._dynamo.reset()
    blocks = [parts.load(f"transformer_blocks.{i}") for i in range(2)]
    eager = [JointBlock(copy.deepcopy(b)) for b in blocks]
    compiled = [JointBlock(copy.deepcopy(b), compile_backend=broken_backend) for b in blocks]
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(3, 64, 16, generator=g), torch.randn(3, 12, 16, generator=g), torch.randn(3, 16, generator=g)]
    outs = []
    for layers in (eager, compiled):
        acts = pack(*x)
        for layer in layers:
            acts = layer(acts)
        outs.append(unpack(acts)[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    assert JointBlock.compile_failure is not None and "no compiler here" in JointBlock.compile_failure
    assert len(attempts) == 1 and not compiled[1].compiled


def test_the_front_encodes_windows_through_the_compiled_vae_encoder_and_falls_back_to_eager(tmp_path, capsys):
    """pipeline.compile_vae: the front's VAE encoder runs through torch.compile (here a backend that records what
    it is given and runs it), compiled once for the window shape, its latent the eager encoder's; a backend that
    fails is said in one warning, and the encoder runs eagerly from then on."""
    from models.sd3 import LatentEncoder
    from models.segformer import Segmenter
    from models.tiny import make_tiny_segformer
    from data.classes import ADE20K_CLASSES
    from pipeline.dusa.layers import SegmenterFront
    from pipeline.dusa.windows import WindowDraw
    make_tiny_sd3(tmp_path / "sd3", num_layers=1)
    make_tiny_segformer(tmp_path / "seg", ADE20K_CLASSES)
    graphs, attempts = [], []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def broken(gm, example_inputs):
        attempts.append(gm)
        raise RuntimeError("no compiler here")

    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    latents = {}
    for backend in (None, recording, broken):
        torch._dynamo.reset()
        front = SegmenterFront(Segmenter.from_pretrained(str(tmp_path / "seg")),
                               LatentEncoder.from_pretrained(str(tmp_path / "sd3")), 64, 1, 3, 0,
                               compile_encoder=backend)
        draws = [WindowDraw(corner=(0, left), noise=torch.zeros(1, 16, 8, 8), t=torch.tensor([0.25]), seed=left)
                 for left in (0, 32)]
        prepared = front.begin_image(image, draws)
        with torch.no_grad():
            latents[backend] = [unpack(front(inputs))[5] for inputs in prepared.inputs]  # target = -z0 here
        assert not any("compiled" in k for k in front.state_dict())  # the compiled function is kept beside
    for eager, compiled, fallback in zip(latents[None], latents[recording], latents[broken]):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
        torch.testing.assert_close(fallback, eager, rtol=0, atol=0)
    assert len(graphs) == 1 and len(attempts) == 1  # one compile for both windows; no second attempt
    captured = capsys.readouterr()
    said, warned = captured.out.splitlines(), captured.err.splitlines()
    assert said.count("compiling the VAE encoder (torch.compile: about 25 s on a first run, seconds from torch's "
                      "cache under /tmp later; --pipeline.compile_vae false: eager)") == 2
    assert [line for line in warned if line.startswith("warning")] == [
        "warning: the VAE encoder could not be compiled (RuntimeError: no compiler here); it runs eagerly "
        "(--pipeline.compile_vae false skips the attempt)"]
