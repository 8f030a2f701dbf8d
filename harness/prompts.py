"""The one prompt builder, shared by training and evaluation.

A prompt is the problem plus an instruction to reason inside ``<think> ... </think>`` and give only
the final answer inside ``<answer> ... </answer>``, rendered with the model's chat template
(``add_generation_prompt=True``), so the trainer's rollouts and the evaluator's samples see
byte-identical prompts for the same problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. You first think about the reasoning process and then give the "
    "user the answer."
)
DEFAULT_TEMPLATE = (
    "{problem}\n\nShow your reasoning inside <think> </think> tags, then give only the final answer "
    "inside <answer> </answer> tags, for example: <think> reasoning here </think> <answer> 42 </answer>"
)


@dataclass(frozen=True)
class PromptConfig:
    """How a problem becomes a chat. ``system_prompt=None`` sends no system message."""

    template: str = DEFAULT_TEMPLATE
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if "{problem}" not in self.template:
            raise ValueError(f"prompt.template must contain '{{problem}}', got {self.template!r}")


def build_messages(problem: str, cfg: PromptConfig | None = None) -> list[dict[str, str]]:
    """The chat messages for one problem."""
    cfg = cfg or PromptConfig()
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": cfg.template.replace("{problem}", problem)})
    return messages


def render_prompt(tokenizer: Any, problem: str, cfg: PromptConfig | None = None) -> str:
    """The prompt text for one problem, rendered with ``tokenizer``'s chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template; "
            "set one (tokenizer.chat_template) or use an instruct model"
        )
    return tokenizer.apply_chat_template(build_messages(problem, cfg), tokenize=False, add_generation_prompt=True)


def prompt_config(cfg: Any | None) -> PromptConfig:
    """Build a :class:`PromptConfig` from a mapping such as the Hydra ``prompt`` node."""
    if cfg is None:
        return PromptConfig()
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    return PromptConfig(template=get("template", DEFAULT_TEMPLATE),
                        system_prompt=get("system_prompt", DEFAULT_SYSTEM_PROMPT))
