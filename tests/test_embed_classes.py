"""The class-embedding builder equals diffusers' SD3 `encode_prompt`, loads one encoder at a time,
and its CLI writes a cache that `load_class_embeddings` accepts only for its classes and model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors import safe_open
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

import models.class_embeddings as ce
from launch.embed_classes import main
from models.class_embeddings import (EmbedError, build_class_embeddings, load_class_embeddings, make_prompts,
                                     read_class_list)
from models.tiny import (TINY_JOINT_DIM, TINY_POOLED_DIM, TINY_TEXT_TOKENS, make_tiny_class_embeddings,
                         make_tiny_sd3, make_tiny_text_encoders)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "a photo of a {}"
# A plain name, one with spaces/commas/capitals, and one whose prompt exceeds CLIP's 77 tokens
# (the tiny tokenizers are character-level) and the T5 length.
CLASSES = ["wall", "Traffic light, stop sign", "chest of drawers, chest, bureau, dresser " * 3, "sky"]
T5_TOKENS = 24
# Names and classes as in the published SD3 model_index.json.
MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "image_encoder": [None, None], "feature_extractor": [None, None]}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Path:
    folder = make_tiny_sd3(tmp_path_factory.mktemp("embed") / "sd3", num_layers=1)
    make_tiny_text_encoders(folder)
    FlowMatchEulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return folder


def copy_without(folder: Path, dest: Path, *subfolders: str) -> Path:
    shutil.copytree(folder, dest, ignore=lambda d, names: [n for n in names if Path(d) == folder and n in subfolders])
    return dest


def diffusers_embeddings(pipe: StableDiffusion3Pipeline, prompt: str, max_sequence_length: int):
    with torch.no_grad():  # as in the pipeline's __call__
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device="cpu", num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    return prompt_embeds, pooled


def assert_matches(got: torch.Tensor, reference: torch.Tensor, name: str = "") -> None:
    """Equal to diffusers' embedding up to float32 rounding: the prompts run here in batches, there one at a
    time, and a batch changes how the matmuls are blocked (seen: 5 ulps apart, 1.2e-6 at values near 2)."""
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_equals_diffusers_encode_prompt(sd3):
    clip_lengths = [len(CLIPTokenizer.from_pretrained(sd3, subfolder="tokenizer")(p).input_ids)
                    for p in make_prompts(TEMPLATE, CLASSES)]
    assert max(clip_lengths) > 77  # the long prompt is truncated by CLIP
    # Batches of 3: one full batch and one of 1.
    prompt_embeds, pooled = build_class_embeddings(str(sd3), CLASSES, TEMPLATE, T5_TOKENS, "cpu", torch.float32, 3)
    assert prompt_embeds.shape == (len(CLASSES), 77 + T5_TOKENS, TINY_JOINT_DIM)
    assert pooled.shape == (len(CLASSES), TINY_POOLED_DIM)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3)
    for i, name in enumerate(CLASSES):
        ref_embeds, ref_pooled = diffusers_embeddings(pipe, TEMPLATE.replace("{}", name), T5_TOKENS)
        assert ref_embeds.shape == (1, 77 + T5_TOKENS, TINY_JOINT_DIM) and ref_pooled.shape == (1, TINY_POOLED_DIM)
        assert_matches(prompt_embeds[i], ref_embeds[0], name)
        assert_matches(pooled[i], ref_pooled[0], name)
    # The CLIP tokens are zero-padded from 8 + 16 to the T5 width; distinct prompts give distinct rows.
    assert prompt_embeds[:, :77, 24:].abs().max() == 0 and prompt_embeds[:, 77:].abs().amax(dim=(1, 2)).min() > 0
    assert not torch.equal(prompt_embeds[0], prompt_embeds[1])


def test_without_t5_gives_zeros_like_diffusers(sd3, tmp_path, capsys):
    folder = copy_without(sd3, tmp_path / "sd3", "text_encoder_3", "tokenizer_3")
    prompt_embeds, pooled = build_class_embeddings(str(folder), CLASSES[:2], TEMPLATE, 16, "cpu", torch.float32)
    assert "no text_encoder_3" in capsys.readouterr().err
    assert prompt_embeds.shape == (2, 77 + 16, TINY_JOINT_DIM) and prompt_embeds[:, 77:].abs().max() == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3, text_encoder_3=None, tokenizer_3=None)
    for i, name in enumerate(CLASSES[:2]):
        ref_embeds, ref_pooled = diffusers_embeddings(pipe, TEMPLATE.replace("{}", name), 16)
        assert_matches(prompt_embeds[i], ref_embeds[0])
        assert_matches(pooled[i], ref_pooled[0])


def test_encoders_loaded_one_at_a_time(sd3, monkeypatch):
    refs: list[weakref.ref] = []
    live_at_load: list[int] = []
    dtypes: list[torch.dtype] = []

    class Recording:
        def __init__(self, cls):
            self.cls = cls

        def from_pretrained(self, *args, **kwargs):
            live_at_load.append(sum(r() is not None for r in refs))
            model = self.cls.from_pretrained(*args, **kwargs)
            refs.append(weakref.ref(model))
            dtypes.append(next(model.parameters()).dtype)
            return model

    monkeypatch.setattr(ce, "CLIPTextModelWithProjection", Recording(CLIPTextModelWithProjection))
    monkeypatch.setattr(ce, "T5EncoderModel", Recording(T5EncoderModel))
    prompt_embeds, pooled = build_class_embeddings(str(sd3), CLASSES, TEMPLATE, 8, "cpu", torch.bfloat16, 2,
                                                   progress=False)
    assert live_at_load == [0, 0, 0]  # CLIP-L, CLIP-G, T5: each loads after the previous one was freed
    assert all(r() is None for r in refs)  # and none outlives the build
    assert dtypes == [torch.bfloat16] * 3
    assert prompt_embeds.dtype == pooled.dtype == torch.bfloat16


def test_cli_writes_a_cache_for_its_classes_and_model(sd3, tmp_path, capsys):
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("# my classes\n\nwall\n  Traffic light, stop sign  \n# sky is next\nsky\n")
    out = tmp_path / "cache" / "tiny.safetensors"
    assert main(["--model", str(sd3), "--out", str(out), "--classes", str(classes_file),
                 "--max_sequence_length", "10", "--device", "cpu", "--dtype", "fp32", "--batch_size", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(out) in last and f"(3, 87, {TINY_JOINT_DIM})" in last and "MiB" in last
    classes = ["wall", "Traffic light, stop sign", "sky"]
    prompt_embeds, pooled = load_class_embeddings(out, classes, str(sd3))
    expected = build_class_embeddings(str(sd3), classes, TEMPLATE, 10, "cpu", torch.float32, 2, progress=False)
    assert torch.equal(prompt_embeds, expected[0]) and torch.equal(pooled, expected[1])
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["template"] == TEMPLATE and meta["sequence_length"] == "87" and meta["t5_sequence_length"] == "10"
    assert meta["dtype"] == "float32"
    with pytest.raises(ValueError, match="other classes"):
        load_class_embeddings(out, ["wall", "sky", "Traffic light, stop sign"], str(sd3))
    with pytest.raises(ValueError, match="rebuild it for this model"):
        load_class_embeddings(out, classes, str(tmp_path / "another-sd3"))


def test_class_list_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# comment\n\n  road \nperson, individual\n\n# end\n")
    assert read_class_list(path) == ["road", "person, individual"]
    path.write_text("# only comments\n\n   \n")
    with pytest.raises(EmbedError, match="empty"):
        read_class_list(path)
    path.write_text("road\nsky\nroad\ntree\nsky\n")
    with pytest.raises(EmbedError, match="duplicates: 'road', 'sky'"):
        read_class_list(path)
    with pytest.raises(EmbedError, match="cannot read"):
        read_class_list(tmp_path / "missing.txt")


def test_templates():
    assert make_prompts("{} in {{the}} scene", ["sky"]) == ["sky in {{the}} scene"]  # other braces stay literal
    with pytest.raises(EmbedError, match="no '{}'"):
        make_prompts("a photo", ["sky"])


@pytest.mark.parametrize("case", ["template", "duplicates", "not_a_folder"])
def test_errors_exit_2_with_one_line(sd3, tmp_path, capsys, case):
    args = ["--model", str(sd3), "--out", str(tmp_path / "x.safetensors"), "--device", "cpu"]
    if case == "template":
        args += ["--template", "a photo"]
    elif case == "duplicates":
        (tmp_path / "c.txt").write_text("sky\nsky\n")
        args += ["--classes", str(tmp_path / "c.txt")]
    else:
        args[1] = str(tmp_path / "nothing-here")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("missing", ["text_encoder_2", "tokenizer"])
def test_script_exits_2_without_a_text_encoder_folder(sd3, tmp_path, missing):
    folder = copy_without(sd3, tmp_path / "sd3", missing)
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "embed_classes.py"), "--model", str(folder),
                             "--out", str(tmp_path / "x.safetensors")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {folder} has no {missing}/ subfolder: not a diffusers "
                                                  f"SD3 folder with its text encoders"]


def test_demo_cache_is_made_by_the_builder(tmp_path):
    folder = make_tiny_sd3(tmp_path / "sd3", num_layers=1)  # no text encoders yet
    classes = ["wall", "sky", "person"]
    out = make_tiny_class_embeddings(tmp_path / "demo.safetensors", classes, folder)
    prompt_embeds, pooled = load_class_embeddings(out, classes, str(folder))
    assert prompt_embeds.shape == (3, TINY_TEXT_TOKENS, TINY_JOINT_DIM) and pooled.shape == (3, TINY_POOLED_DIM)
    expected = build_class_embeddings(str(folder), classes, TEMPLATE, TINY_TEXT_TOKENS - 77, "cpu", torch.float32,
                                      progress=False)
    assert torch.equal(prompt_embeds, expected[0]) and torch.equal(pooled, expected[1])


def test_cli_encodes_in_fp16_by_default_as_the_reference(sd3, tmp_path):
    out = tmp_path / "fp16.safetensors"
    assert main(["--model", str(sd3), "--out", str(out), "--classes", str(_classes_file(tmp_path)),
                 "--max_sequence_length", "10", "--device", "cpu"]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["dtype"] == "float16"
        prompt_embeds, pooled = f.get_tensor("prompt_embeds"), f.get_tensor("pooled")
    assert prompt_embeds.dtype == pooled.dtype == torch.float16
    full = build_class_embeddings(str(sd3), ["wall", "sky"], TEMPLATE, 10, "cpu", torch.float32, 2, progress=False)
    for half, ref in zip((prompt_embeds, pooled), full):  # the same embeddings, to fp16 precision
        assert (half.float() - ref).abs().max() <= 1e-2 * max(ref.abs().max().item(), 1.0)


def _classes_file(folder):
    path = folder / "two-classes.txt"
    path.write_text("wall\nsky\n")
    return path


def test_custom_prompts_are_used_verbatim_and_recorded(sd3, tmp_path):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("sky: 'a wide blue {sky} over the sea'\n")  # braces stay literal
    out = tmp_path / "custom.safetensors"
    assert main(["--model", str(sd3), "--out", str(out), "--classes", str(_classes_file(tmp_path)),
                 "--max_sequence_length", "10", "--device", "cpu", "--dtype", "fp32", "--prompts", str(prompts)]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["custom_prompts"]) == {"sky": "a wide blue {sky} over the sea"}
        prompt_embeds, pooled = f.get_tensor("prompt_embeds"), f.get_tensor("pooled")
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3)
    for i, prompt in enumerate([TEMPLATE.replace("{}", "wall"), "a wide blue {sky} over the sea"]):
        ref_embeds, ref_pooled = diffusers_embeddings(pipe, prompt, 10)
        assert_matches(prompt_embeds[i], ref_embeds[0])
        assert_matches(pooled[i], ref_pooled[0])


def test_custom_prompts_for_unknown_classes_are_refused(sd3, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"skyy": "a sky"}))
    assert main(["--model", str(sd3), "--out", str(tmp_path / "x.safetensors"), "--classes",
                 str(_classes_file(tmp_path)), "--device", "cpu", "--prompts", str(prompts)]) == 2
    assert "'skyy'" in capsys.readouterr().err


def test_cli_makes_the_cityscapes_cache_that_acdc_and_cityscapes_runs_take(sd3, tmp_path):
    from data.cityscapes import CITYSCAPES_CLASSES
    out = tmp_path / "cityscapes.safetensors"
    assert main(["--model", str(sd3), "--out", str(out), "--dataset", "acdc", "--max_sequence_length", "10",
                 "--device", "cpu", "--dtype", "fp32", "--batch_size", "8"]) == 0
    prompt_embeds, pooled = load_class_embeddings(out, CITYSCAPES_CLASSES, str(sd3))  # ACDC: Cityscapes' classes
    assert prompt_embeds.shape[0] == pooled.shape[0] == 19
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["template"] == "a photo of a {}"
