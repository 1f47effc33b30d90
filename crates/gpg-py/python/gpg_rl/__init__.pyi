"""Type stubs of the gpg_rl package (docs/python.md)."""

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

PathLike = Union[str, os.PathLike[str]]
RewardFunc = Callable[..., Optional[Sequence[Optional[float]]]]

__version__: str

class GpgError(RuntimeError):
    """An error of the gpg-rl core, with the message the command line would print."""

class RewardFunctionError(GpgError):
    """A reward function raised, or returned something other than one finite float (or None)
    per completion; the message names the function and the step, __cause__ is the original."""

def demo_recipe() -> str: ...
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
    chat_template_kwargs: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]: ...
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
) -> List[Dict[str, Any]]: ...
def logprobs(
    model: PathLike,
    records: Union[PathLike, Sequence[Mapping[str, Any]]],
    *,
    batch_tokens: int = 8192,
    device: str = "cpu",
    precision: str = "f32",
    adapter: Optional[PathLike] = None,
    chat_template_kwargs: Optional[Mapping[str, Any]] = None,
) -> List[Dict[str, Any]]: ...
def eval(
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
) -> Dict[str, Any]: ...
