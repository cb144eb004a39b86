"""Dictionary loaders: files written in each public layout (SAELens, sparsify, Gemma Scope) and
hookscope's own, read back with the documented keys and shapes; encodings checked against the
format's own formula computed by hand; broken files refused with the key named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hookscope.dictionaries import Dictionary, detect_format, load_dictionary, save_dictionary
from hookscope.errors import ActivationPointError, HookscopeError

D_IN, D_SAE = 8, 12


def _weights(seed: int = 0, d_out: int = D_IN) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "W_dec": torch.randn(D_SAE, d_out, generator=g),
        "b_dec": torch.randn(d_out, generator=g),
    }


def _saelens(folder, cfg: dict, weights: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, folder / "sae_weights.safetensors")
    return folder


def _x(rows: int = 5) -> torch.Tensor:
    return torch.randn(rows, D_IN, generator=torch.Generator().manual_seed(9))


def test_saelens_v5_standard_relu(tmp_path):
    w = _weights()
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "hook_name": "blocks.1.hook_resid_post",
    }
    d = load_dictionary(_saelens(tmp_path / "sae", cfg, w))
    assert (d.reads, d.writes, d.activation, d.name) == (
        "resid_out_1",
        "resid_out_1",
        "relu",
        "sae_resid_out_1",
    )
    x = _x()
    expected = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # SAELens StandardSAE.encode
    torch.testing.assert_close(d.encode(x), expected)
    torch.testing.assert_close(d.decode(expected), expected @ w["W_dec"] + w["b_dec"])


def test_saelens_v5_topk_from_activation_fn_kwargs(tmp_path):
    w = _weights(1)
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "apply_b_dec_to_input": False,
        "hook_name": "blocks.0.hook_resid_pre",
    }
    d = load_dictionary(_saelens(tmp_path / "sae", cfg, w), name="topk0")
    assert (d.activation, d.k, d.reads, d.name) == ("topk", 3, "resid_in_0", "topk0")
    pre = _x() @ w["W_enc"] + w["b_enc"]  # no b_dec subtraction
    top = pre.topk(3, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(d.encode(_x()), expected)


def test_saelens_v6_jumprelu_with_metadata(tmp_path):
    w = {**_weights(2), "threshold": torch.rand(D_SAE, generator=torch.Generator().manual_seed(3))}
    cfg = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.2.hook_resid_post", "model_name": "x"},
    }
    d = load_dictionary(_saelens(tmp_path / "sae", cfg, w))
    assert (d.activation, d.reads) == ("jumprelu", "resid_out_2")
    pre = _x() @ w["W_enc"] + w["b_enc"]
    expected = torch.relu(pre) * (pre > w["threshold"])  # JumpReLUSAE.encode
    torch.testing.assert_close(d.encode(_x()), expected)


def test_saelens_point_override_and_family_dependent_names(tmp_path):
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "hook_name": "blocks.1.hook_mlp_out",
    }
    folder = _saelens(tmp_path / "sae", cfg, _weights())
    with pytest.raises(ActivationPointError, match="depends on the family"):
        load_dictionary(folder)  # hook_mlp_out means mlp_out or mlp_out_post_norm by family
    assert load_dictionary(folder, point="mlp_out_1").reads == "mlp_out_1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda cfg, w: w.pop("W_dec"), r"lacks \['W_dec'\]"),
        (lambda cfg, w: w.__setitem__("W_enc", w["W_enc"].T.contiguous()), "W_enc has shape"),
        (lambda cfg, w: w.__setitem__("b_dec", torch.zeros(D_IN + 1)), "b_dec has shape"),
        (lambda cfg, w: cfg.__setitem__("architecture", "gated"), "'gated' is not supported"),
        (lambda cfg, w: cfg.__setitem__("normalize_activations", "layer_norm"), "layer_norm"),
        (
            lambda cfg, w: cfg.__setitem__("normalize_activations", "expected_average_only_in"),
            "input_scale=",
        ),
        (lambda cfg, w: cfg.__setitem__("architecture", "jumprelu"), r"lacks \['threshold'\]"),
        (lambda cfg, w: cfg.update(architecture="topk"), "needs k"),
        (lambda cfg, w: cfg.__setitem__("hook_head_index", 2), "hook_head_index"),
        (lambda cfg, w: cfg.pop("d_sae"), "d_sae must be a positive int"),
    ],
)
def test_broken_saelens_files_are_refused(tmp_path, change, message):
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "hook_name": "blocks.1.hook_resid_post",
    }
    w = _weights()
    change(cfg, w)
    with pytest.raises(HookscopeError, match=message):
        load_dictionary(_saelens(tmp_path / "sae", cfg, w))


def _sparsify(folder, cfg: dict, weights: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, folder / "sae.safetensors")
    return folder


def _sparsify_weights(seed: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {  # SparseCoder's state dict: encoder is an nn.Linear(d_in, num_latents)
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.1,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }


def _sparsify_encode(w, x, k, transcode=False):
    """sparsify's SparseCoder.encode: topk(relu(linear(x - b_dec))) -> dense."""
    pre = torch.relu(
        torch.nn.functional.linear(
            x if transcode else x - w["b_dec"], w["encoder.weight"], w["encoder.bias"]
        )
    )
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


def test_sparsify_sae_folder_named_by_hookpoint(tmp_path):
    w = _sparsify_weights()
    cfg = {"activation": "topk", "expansion_factor": 32, "num_latents": D_SAE, "k": 4, "d_in": D_IN}
    d = load_dictionary(_sparsify(tmp_path / "layers.3", cfg, w))
    assert (d.reads, d.activation, d.k, d.subtract_decoder_bias) == ("resid_out_3", "topk", 4, True)
    torch.testing.assert_close(d.encode(_x()), _sparsify_encode(w, _x(), 4))
    f = d.encode(_x())
    torch.testing.assert_close(d.decode(f), f @ w["W_dec"] + w["b_dec"])


def test_sparsify_transcoder_reads_the_mlp_input(tmp_path):
    w = _sparsify_weights(5)
    cfg = {"num_latents": D_SAE, "k": 3, "d_in": D_IN, "transcode": True}
    d = load_dictionary(_sparsify(tmp_path / "model.layers.2.mlp", cfg, w))
    assert (d.reads, d.writes, d.subtract_decoder_bias) == ("mlp_in_2", "mlp_out_2", False)
    torch.testing.assert_close(d.encode(_x()), _sparsify_encode(w, _x(), 3, transcode=True))


def test_sparsify_expansion_factor_and_refusals(tmp_path):
    w = _sparsify_weights()
    cfg = {"num_latents": 0, "expansion_factor": 2, "k": 4, "d_in": D_IN}  # 2 * 8 = 16 != 12
    with pytest.raises(HookscopeError, match="encoder.weight has shape"):
        load_dictionary(_sparsify(tmp_path / "layers.1", cfg, w))
    skip = {**w, "W_skip": torch.zeros(D_IN, D_IN)}
    cfg = {"num_latents": D_SAE, "k": 4, "d_in": D_IN}
    with pytest.raises(HookscopeError, match="W_skip"):
        load_dictionary(_sparsify(tmp_path / "b" / "layers.1", cfg, skip))
    with pytest.raises(HookscopeError, match="groupmax"):
        load_dictionary(
            _sparsify(tmp_path / "c" / "layers.1", {**cfg, "activation": "groupmax"}, w)
        )
    with pytest.raises(HookscopeError, match="pass point="):
        load_dictionary(_sparsify(tmp_path / "embed_tokens", cfg, w))


def test_gemma_scope_npz_point_from_the_release_path(tmp_path):
    w = {k: v.numpy() for k, v in _weights(6).items()}
    w["threshold"] = np.abs(np.random.default_rng(0).normal(size=D_SAE)).astype(np.float32)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **w)
    d = load_dictionary(folder / "params.npz")
    assert (detect_format(folder), d.reads, d.activation, d.subtract_decoder_bias) == (
        "gemma_scope", "resid_out_3", "jumprelu", False,
    )  # fmt: skip
    x = _x()
    pre = x @ torch.from_numpy(w["W_enc"]) + torch.from_numpy(w["b_enc"])
    expected = torch.relu(pre) * (pre > torch.from_numpy(w["threshold"]))  # the tutorial's encode
    torch.testing.assert_close(d.encode(x), expected)
    mlp = tmp_path / "gemma-scope-2b-pt-mlp" / "layer_4" / "params.npz"
    mlp.parent.mkdir(parents=True)
    np.savez(mlp, **w)
    assert load_dictionary(mlp).reads == "mlp_out_post_norm_4"


def test_gemma_scope_safetensors_and_refusals(tmp_path):
    w = {**_weights(7), "threshold": torch.full((D_SAE,), 0.2)}
    save_file(w, tmp_path / "params.safetensors")
    with pytest.raises(HookscopeError, match="pass point="):
        load_dictionary(tmp_path / "params.safetensors")  # no release path to read the point from
    d = load_dictionary(tmp_path / "params.safetensors", point="resid_out_0")
    torch.testing.assert_close(d.threshold, w["threshold"])
    pickled = tmp_path / "pickled" / "params.npz"
    pickled.parent.mkdir()
    np.savez(pickled, W_enc=np.array([object()], dtype=object))
    with pytest.raises(HookscopeError, match="without pickle"):
        load_dictionary(pickled, point="resid_out_0")
    missing = tmp_path / "missing" / "params.npz"
    missing.parent.mkdir()
    np.savez(missing, **{k: v.numpy() for k, v in w.items() if k != "threshold"})
    with pytest.raises(HookscopeError, match=r"lacks \['threshold'\]"):
        load_dictionary(missing, point="resid_out_0")


def test_native_round_trip_keeps_every_field(tmp_path):
    w = _weights(8, d_out=6)
    d = Dictionary(
        **w, activation="batchtopk", k=3, threshold=torch.full((D_SAE,), 0.1), reads="mlp_in_1",
        writes="mlp_out_1", input_scale=0.5, subtract_decoder_bias=False, name="tc1",
        metadata={"trained_on": "store", "explained_variance": 0.81},
    )  # fmt: skip
    back = load_dictionary(save_dictionary(d, tmp_path / "tc1"))
    for field in (
        "activation",
        "reads",
        "writes",
        "k",
        "input_scale",
        "subtract_decoder_bias",
        "name",
        "metadata",
    ):
        assert getattr(back, field) == getattr(d, field), field
    for key in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(back, key), getattr(d, key)), key
    torch.testing.assert_close(back.reconstruct(_x()), d.reconstruct(_x()))
    assert load_dictionary(tmp_path / "tc1", name="renamed").name == "renamed"


def test_unknown_layouts_list_the_known_formats(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(HookscopeError, match="SAELens.*sparsify.*Gemma Scope"):
        load_dictionary(tmp_path)
    with pytest.raises(HookscopeError, match="does not exist"):
        load_dictionary(tmp_path / "nowhere")


def test_saelens_transcoder_reads_one_hook_and_writes_another(tmp_path):
    w = _weights(10, d_out=6)
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "d_out": 6,
        "apply_b_dec_to_input": False,
        "metadata": {
            "hook_name": "blocks.1.hook_resid_mid",
            "hook_name_out": "blocks.1.hook_resid_post",
        },
    }
    d = load_dictionary(_saelens(tmp_path / "tc", cfg, w))
    assert (d.reads, d.writes, d.is_transcoder, d.name) == (
        "resid_mid_1", "resid_out_1", True, "transcoder_resid_out_1",
    )  # fmt: skip
    expected = torch.relu(_x() @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(d.reconstruct(_x()), expected)


def test_arguments_a_format_would_ignore_are_refused(tmp_path):
    """point= on a hookscope folder and input_scale= on Gemma Scope used to be dropped silently."""
    native = save_dictionary(Dictionary(**_weights(3), activation="relu", reads="resid_out_1"),
                             tmp_path / "native")  # fmt: skip
    with pytest.raises(HookscopeError, match=r"does not use \['point'\]"):
        load_dictionary(native, point="resid_out_0")
    w = {**_weights(7), "threshold": torch.full((D_SAE,), 0.2)}
    save_file(w, tmp_path / "params.safetensors")
    with pytest.raises(HookscopeError, match=r"gemma_scope.*\['input_scale'\]"):
        load_dictionary(tmp_path / "params.safetensors", point="resid_out_0", input_scale=2.0)
    assert load_dictionary(native).reads == "resid_out_1"


def test_gemma_scope_nan_threshold_and_integer_weights_are_refused(tmp_path):
    """A NaN threshold passed the `< 0` check and zeroed every feature; an int W_enc cast the
    model's activations to ints before encoding."""
    w = {k: v.numpy() for k, v in _weights(6).items()}
    np.savez(tmp_path / "nan.npz", **w, threshold=np.full(D_SAE, np.nan, np.float32))
    with pytest.raises(HookscopeError, match="negative or NaN"):
        load_dictionary(tmp_path / "nan.npz", point="resid_out_0")
    ints = {**w, "W_enc": w["W_enc"].astype(np.int32)}
    np.savez(tmp_path / "int.npz", **ints, threshold=np.zeros(D_SAE, np.float32))
    with pytest.raises(HookscopeError, match="W_enc has dtype torch.int32"):
        load_dictionary(tmp_path / "int.npz", point="resid_out_0")


def test_saelens_jumprelu_with_a_negative_threshold_is_refused(tmp_path):
    """SAELens encodes relu(pre) * (pre > threshold): with threshold -0.5 a pre-activation of
    -0.2 gives 0 there but -0.2 in hookscope's pre * (pre > threshold); it loaded silently."""
    threshold = torch.full((D_SAE,), -0.5)
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE,
           "hook_name": "blocks.2.hook_resid_post"}  # fmt: skip
    folder = _saelens(tmp_path / "sae", cfg, {**_weights(2), "threshold": threshold})
    with pytest.raises(HookscopeError, match="negative or NaN entries; SAELens"):
        load_dictionary(folder)


def test_gemma_scope_extra_arrays_are_refused(tmp_path):
    """An array beside Gemma Scope's five was ignored: the encoding could differ from the file's."""
    w = {k: v.numpy() for k, v in _weights(6).items()}
    np.savez(tmp_path / "extra.npz", **w, threshold=np.zeros(D_SAE, np.float32), extra=np.zeros(3))
    with pytest.raises(HookscopeError, match=r"unexpected arrays \['extra'\]"):
        load_dictionary(tmp_path / "extra.npz", point="resid_out_0")


def test_point_cannot_contradict_the_files(tmp_path):
    """point= silently replaced a SAELens hook_name on another layer."""
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE,
           "hook_name": "blocks.1.hook_resid_post"}  # fmt: skip
    folder = _saelens(tmp_path / "sae", cfg, _weights(4))
    with pytest.raises(HookscopeError, match="contradicts the point the files record"):
        load_dictionary(folder, point="resid_out_0")
    assert load_dictionary(folder, point="resid_out_1").reads == "resid_out_1"
