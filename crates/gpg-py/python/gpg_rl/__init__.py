"""gpg-rl from Python: GPG / GRPO / Dr.GRPO training with Python reward functions.

The same Rust core as the ``gpg-rl`` command line (docs/python.md):

* :func:`train` — ``gpg-rl train``, with TRL-style ``reward_funcs``;
* :func:`generate` — ``gpg-rl generate --format json``;
* :func:`logprobs` — ``gpg-rl logprobs``;
* :func:`eval` — ``gpg-rl eval --json``.

The GIL is released while the core runs; it is taken only to call the reward functions.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from . import _gpg_rl
from ._gpg_rl import GpgError, RewardFunctionError

__all__ = [
    "train",
    "generate",
    "logprobs",
    "eval",
    "demo_recipe",
    "GpgError",
    "RewardFunctionError",
    "__version__",
]

__version__: str = _gpg_rl.__version__

PathLike = Union[str, "os.PathLike[str]"]
RewardFunc = Callable[..., Optional[Sequence[Optional[float]]]]


def _toml_value(value: Any) -> str:
    """A Python value as a TOML literal (for ``key=value`` overrides)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a recipe value")


def _overrides(overrides: Union[None, Mapping[str, Any], Sequence[str]]) -> List[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={_toml_value(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return [str(o) for o in overrides]


def _template_kwargs(kwargs: Optional[Mapping[str, Any]]) -> Optional[str]:
    """``chat_template_kwargs`` (a dict, or JSON text) as JSON text for the core."""
    if kwargs is None:
        return None
    if isinstance(kwargs, str):
        return kwargs
    if not isinstance(kwargs, Mapping):
        raise TypeError(
            f"chat_template_kwargs must be a dict such as {{'enable_thinking': False}}, "
            f"not {type(kwargs).__name__}"
        )
    return json.dumps(dict(kwargs), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) in a recipe")


def demo_recipe() -> str:
    """The built-in demo recipe (recipes/demo.toml) as TOML text."""
    return _gpg_rl.demo_recipe()


def train(
    recipe: Union[None, PathLike, Mapping[str, Any]] = None,
    *,
    reward_funcs: Optional[Sequence[Union[RewardFunc, str]]] = None,
    reward_weights: Optional[Sequence[float]] = None,
    overrides: Union[None, Mapping[str, Any], Sequence[str]] = None,
    output_dir: Optional[PathLike] = None,
    steps: Optional[int] = None,
    model: Optional[PathLike] = None,
    resume: bool = False,
    quiet: bool = False,
) -> Dict[str, Any]:
    """Trains as ``gpg-rl train`` does and returns the run's summary.

    recipe: a TOML recipe path, a recipe dict (the TOML's shape), or None for the built-in demo.
    reward_funcs: replace the recipe's ``[reward]`` functions. Each is a callable with TRL's
        signature, ``f(prompts, completions, **kwargs) -> list[float | None]``, called once per
        sampling round with the whole batch (keywords: ``prompts``, ``completions``,
        ``answer`` — the dataset's gold answers, also under ``data.fields.answer_field`` —,
        ``completion_lengths`` in tokens, and every other field of the dataset's records under
        its own name, one value per completion, as TRL passes dataset columns); or a built-in
        reward's name (``"accuracy"``,
        ``"format"``, …). None items count 0. The per-function metric is named after the
        function's ``__name__``.
    reward_weights: one weight per reward function (default 1 each).
    overrides: recipe keys to set, as ``{"optim.lr": 2e-6}`` or ``["optim.lr=2e-6"]`` (``--set``).
    output_dir, steps, model: shorthands for those overrides.
    resume: continue the run in ``output_dir`` from its newest checkpoint.
    quiet: no progress bar.

    Returns a dict: ``output_dir``, ``final_dir``, ``start_step``, ``step``, ``step_seconds``,
    ``pass_at_1_before``, ``pass_at_1_after``, ``summary`` (the lines the CLI prints) and
    ``metrics`` (metrics.jsonl's records).

    Raises RewardFunctionError when a reward function raises or returns something other than
    one finite float (or None) per completion (the message names the function and the step;
    the checkpoints written before stay intact), KeyboardInterrupt on Ctrl-C (the run stops
    before its next step or rollout round; its checkpoints stay intact), GpgError for anything
    else.
    """
    recipe_path: Optional[str] = None
    recipe_json: Optional[str] = None
    if isinstance(recipe, Mapping):
        recipe_json = json.dumps(recipe, default=_json_default)
    elif recipe is not None:
        recipe_path = os.fspath(recipe)
    sets = _overrides(overrides)
    if output_dir is not None:
        sets.append(f"output_dir={_toml_value(output_dir)}")
    if steps is not None:
        sets.append(f"steps={int(steps)}")
    if model is not None:
        sets.append(f"model={_toml_value(model)}")
    funcs = None if reward_funcs is None else list(reward_funcs)
    weights = None if reward_weights is None else [float(w) for w in reward_weights]
    summary = json.loads(
        _gpg_rl.train(
            recipe_path,
            recipe_json,
            sets,
            model is not None,
            funcs,
            weights,
            bool(resume),
            bool(quiet),
        )
    )
    metrics_path = os.path.join(summary["output_dir"], "metrics.jsonl")
    with open(metrics_path, encoding="utf-8") as f:
        summary["metrics"] = [json.loads(line) for line in f if line.strip()]
    return summary


def generate(
    model: PathLike,
    prompts: Union[str, Sequence[str]],
    *,
    chat: bool = False,
    system: Optional[str] = None,
    images: Sequence[PathLike] = (),
    max_new_tokens: int = 256,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    seed: int = 0,
    n: int = 1,
    ignore_eos: bool = False,
    stop: Sequence[str] = (),
    device: str = "cpu",
    precision: str = "f32",
    adapter: Optional[PathLike] = None,
    chat_template_kwargs: Optional[Mapping[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Samples ``n`` completions per prompt, as ``gpg-rl generate --format json``.

    Returns one dict per completion (prompt-major): ``prompt_index``, ``sample_index``,
    ``prompt``, ``prompt_ids``, ``token_ids``, ``text``, ``logprobs``, ``finish_reason``.
    Sampling defaults (None) come from the model's generation_config.json.
    chat_template_kwargs: extra chat-template variables (with ``chat=True``), e.g.
    ``{"enable_thinking": False}`` for Qwen3 (``--chat-template-kwargs``).
    """
    if chat_template_kwargs is not None and not chat:
        raise ValueError("chat_template_kwargs needs chat=True (it is passed to the chat template)")
    if isinstance(prompts, str):
        prompts = [prompts]
    lines = _gpg_rl.generate(
        os.fspath(model),
        list(prompts),
        chat,
        system,
        [os.fspath(p) for p in images],
        int(max_new_tokens),
        temperature,
        top_p,
        top_k,
        int(seed),
        int(n),
        ignore_eos,
        list(stop),
        device,
        precision,
        None if adapter is None else os.fspath(adapter),
        _template_kwargs(chat_template_kwargs),
    )
    return [json.loads(line) for line in lines]


def logprobs(
    model: PathLike,
    records: Union[PathLike, Sequence[Mapping[str, Any]]],
    *,
    batch_tokens: int = 8192,
    device: str = "cpu",
    precision: str = "f32",
    adapter: Optional[PathLike] = None,
    chat_template_kwargs: Optional[Mapping[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Log-prob of every completion token, as ``gpg-rl logprobs``.

    records: dicts ``{"prompt": str, "completion": str}`` (Qwen2-VL-family models also
        ``{"messages": [...], "completion": str}``), or a JSONL file of them.
    chat_template_kwargs: extra chat-template variables for ``messages`` records
        (Qwen2-VL-family models; a text model's records are raw text).
    Returns each record with ``completion_ids`` and ``logprobs`` added.
    """
    path: Optional[str] = None
    texts: Optional[List[str]] = None
    if isinstance(records, (str, os.PathLike)):
        path = os.fspath(records)
    else:
        texts = [json.dumps(r, default=_json_default) for r in records]
    lines = _gpg_rl.logprobs(
        os.fspath(model),
        texts,
        path,
        int(batch_tokens),
        device,
        precision,
        None if adapter is None else os.fspath(adapter),
        _template_kwargs(chat_template_kwargs),
    )
    return [json.loads(line) for line in lines]


def eval(  # noqa: A001 (mirrors `gpg-rl eval`)
    model: PathLike,
    benchmark: str,
    *,
    samples: int = 1,
    temperature: float = 0.6,
    top_p: float = 0.95,
    top_k: int = 0,
    max_new_tokens: int = 1024,
    seed: int = 0,
    limit: Optional[int] = None,
    batch_prompts: int = 16,
    output: Union[None, bool, PathLike] = None,
    chat: bool = True,
    system: Union[None, bool, str] = None,
    stop: Sequence[str] = (),
    device: str = "cpu",
    precision: str = "f32",
    adapter: Optional[PathLike] = None,
    quiet: bool = False,
    chat_template_kwargs: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """pass@1 and pass@k on a benchmark, as ``gpg-rl eval --json``; returns the summary dict.

    output: per-item results file; None: ``<model>/eval-<benchmark>.jsonl``; False: none.
    system: the instruction before the problem; None: the default; False: none.
    chat_template_kwargs: extra chat-template variables, e.g. ``{"enable_thinking": False}``
    for Qwen3 (``--chat-template-kwargs``).
    """
    if chat_template_kwargs is not None and not chat:
        raise ValueError("chat_template_kwargs needs chat=True (it is passed to the chat template)")
    write_output = output is not False
    out_path = None if output is None or output is False or output is True else os.fspath(output)
    no_system = system is False
    system_text = system if isinstance(system, str) else None
    return json.loads(
        _gpg_rl.evaluate(
            os.fspath(model),
            benchmark,
            int(samples),
            float(temperature),
            float(top_p),
            int(top_k),
            int(max_new_tokens),
            int(seed),
            limit,
            int(batch_prompts),
            out_path,
            write_output,
            chat,
            system_text,
            no_system,
            list(stop),
            device,
            precision,
            None if adapter is None else os.fspath(adapter),
            quiet,
            _template_kwargs(chat_template_kwargs),
        )
    )
