"""The ``hf`` engine: ``transformers`` ``generate`` in this process, left-padded batches, ``num_return_sequences=k``;
greedy at T = 0."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from harness.evaluation.generation import Completion, Engine, Sampling, auto_device, engine_dtype, eos_token_ids


class HFEngine(Engine):
    """``transformers`` ``generate`` with left-padded batches; ``batch_size`` counts sequences (prompts x k)."""

    name = "hf"

    def __init__(
        self,
        model_path: str,
        *,
        batch_size: int = 64,
        device: str = "auto",
        dtype: str = "auto",
        tokenizer: Any = None,
        progress: bool = True,
        num_threads: int | None = None,
        config_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.model_path = model_path
        # Config values replaced at load time (``eval.context_len``: max_position_embeddings), as vLLM's hf_overrides.
        self.config_overrides = dict(config_overrides or {})
        self.num_threads = num_threads
        self.batch_size = int(batch_size)
        self.device = auto_device(device)
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.model: Any = None
        self.progress = progress

    def _load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=engine_dtype(self.dtype, self.model_path),
                                                     **self.config_overrides)
        self.model = model.to(self.device).eval()

    def _generation_config(self, k: int, sampling: Sampling, eos: list[int], pad: int) -> Any:
        from transformers import GenerationConfig

        common = {
            "max_new_tokens": sampling.max_new_tokens,
            "num_beams": 1,
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "eos_token_id": eos,
            "pad_token_id": pad,
        }
        if sampling.temperature == 0:
            # Greedy ignores the sampling knobs (setting them only triggers "flags ignored" warnings).
            return GenerationConfig(do_sample=False, num_return_sequences=1, **common)
        # Every knob that changes the distribution is set explicitly: generate() fills unset (None) fields from the
        # checkpoint's generation_config.json, and e.g. Qwen2.5-Instruct ships top_k=20, top_p=0.8 and
        # repetition_penalty=1.05, which vLLM (given explicit SamplingParams) does not apply.
        return GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            min_p=0.0,
            typical_p=1.0,
            num_return_sequences=k,
            **common,
        )

    def generate(self, prompts: Sequence[str], k: int, sampling: Sampling) -> list[list[Completion]]:
        import torch

        if self.num_threads is None:
            return self._generate(prompts, k, sampling)
        # CPU threads for this call only. On an oversubscribed machine OpenMP threads spin-wait for each other, so
        # one thread per process is far faster than several when cells share the cores.
        saved = torch.get_num_threads()
        torch.set_num_threads(int(self.num_threads))
        try:
            return self._generate(prompts, k, sampling)
        finally:
            torch.set_num_threads(saved)

    def _generate(self, prompts: Sequence[str], k: int, sampling: Sampling) -> list[list[Completion]]:
        import torch
        from tqdm.auto import tqdm

        self._load()
        tok, model = self.tokenizer, self.model
        eos = eos_token_ids(tok, model.generation_config)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        gen_cfg = self._generation_config(k, sampling, eos, pad)
        greedy = sampling.temperature == 0
        per_prompt = 1 if greedy else k
        # The chat template already wrote the special tokens: add none (same as vLLM's worker and lm-eval's HF).
        ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
        # Longest first: batches of similar length waste little compute on padding.
        order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
        step = max(1, self.batch_size // per_prompt)
        out: list[list[Completion] | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts) * per_prompt, desc="hf generate", unit="seq", disable=not self.progress)
        for b, start in enumerate(range(0, len(order), step)):
            idx = order[start : start + step]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: generation continues right after the prompt
                input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]) :] = 1
            if sampling.seed is not None and not greedy:
                # generate() draws from the global RNG; a per-batch seed keeps results independent of earlier work.
                torch.manual_seed(sampling.seed + b)
            with torch.no_grad():
                seqs = model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=gen_cfg,
                )
            gen = seqs[:, width:].tolist()
            for row, i in enumerate(idx):
                comps = [self._completion(gen[row * per_prompt + j], eos) for j in range(per_prompt)]
                out[i] = comps * k if greedy else comps
            bar.update(len(idx) * per_prompt)
        bar.close()
        return out  # type: ignore[return-value]

    def _completion(self, tokens: list[int], eos: list[int]) -> Completion:
        eos_set = set(eos)
        end = next((j for j, t in enumerate(tokens) if t in eos_set), None)
        if end is None:
            return Completion(self.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), "length")
        # The EOS token counts as generated (as in vLLM's token_ids) but is not part of the text.
        return Completion(self.tokenizer.decode(tokens[:end], skip_special_tokens=True), end + 1, "stop")

    def close(self) -> None:
        self.model = None
