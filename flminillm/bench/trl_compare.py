"""TRL's DistillationTrainer against our on-policy distill step (`flminillm bench perf`;
only when trl is installed)."""

from __future__ import annotations

import statistics
import time

from flminillm.bench.harness import Figure, tiny_model


def bench_trl(
    steps: int = 30,
    batch_size: int = 32,
    new_tokens: int = 8,
    device: str = "cpu",
    shape: tuple[int, int, int] = (128, 4, 4),
) -> tuple[list, dict]:
    """TRL's DistillationTrainer (beta=1.0: reverse KL, on-policy) vs our pipeline's work for
    the same step, on the same student, teacher, prompts and completion length: student
    sampling, teacher scoring, one MiniLLM update. Tokens are completion tokens trained on.
    `device` cuda: both on the GPU in bf16 (autocast for ours, TRL's bf16); `shape`:
    (hidden, layers, heads) of the llama student and teacher."""
    import tempfile
    import warnings

    import torch
    from transformers import TrainerCallback

    from flminillm.config import DistillConfig
    from flminillm.data import format_prompt
    from flminillm.engine import make_engine
    from flminillm.generation import encode_prompts, sample, score
    from flminillm.tokenizer import train_tokenizer
    from flminillm.update import behaviour_logprobs, update_step

    warnings.filterwarnings("ignore")
    texts = [
        f"What is {i} plus {i + 3}? The answer is {2 * i + 3}. Repeat apple{i}." for i in range(400)
    ]
    tok = train_tokenizer(texts, 512)
    vocab = len(tok)
    prompts = [format_prompt(f"What is {i} plus {i + 1}?") for i in range(batch_size * (steps + 1))]

    # ours: sample -> score -> one update per batch (the first batch is a warm-up)
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    student = tiny_model("llama", *shape, vocab).to(dev)
    teacher = tiny_model("llama", *shape, vocab, seed=1).eval().to(dev)
    eng = make_engine(student, 1e-3, 0.0, 1.0)
    g = torch.Generator(device=dev).manual_seed(0)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    ours_tokens, ours_times = 0, []
    for i in range(steps + 1):
        ids, mask = encode_prompts(tok, prompts[i * batch_size : (i + 1) * batch_size], 48)
        ids, mask = ids.to(dev), mask.to(dev)
        sync()
        t = time.perf_counter()
        with eng.autocast():
            r = sample(
                student, ids, mask, max_new_tokens=new_tokens, eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id, top_k=8, generator=g,
            )  # fmt: skip
            tl, _ = score(teacher, r.prompt_ids, r.prompt_mask, r.response_ids,
                          r.response_mask, r.support_ids)  # fmt: skip
            batch = {
                "prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask,
                "response_ids": r.response_ids, "response_mask": r.response_mask,
                "support_ids": r.support_ids, "teacher_logp": tl,
                "from_teacher": torch.zeros(len(r.prompt_ids), dtype=torch.bool, device=dev),
            }  # fmt: skip
            behaviour = behaviour_logprobs(student, batch)
        student.train()
        update_step(eng, batch, behaviour, DistillConfig(teacher_mixed=False),
                    has_teacher_rows=False)  # fmt: skip
        sync()
        if i:
            ours_times.append(time.perf_counter() - t)
            ours_tokens += int(r.response_mask.sum())

    # TRL: the same architectures and weights, freshly built
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.times = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size,
        max_steps=steps + 1, max_completion_length=new_tokens, beta=1.0, bf16=on_gpu,
        gradient_checkpointing=False, use_cpu=not on_gpu, report_to=[], logging_steps=1,
        save_strategy="no", temperature=1.0, top_k=0, learning_rate=1e-3,
        disable_dropout=True, shuffle_dataset=False,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=tiny_model("llama", *shape, vocab),
        teacher_model=tiny_model("llama", *shape, vocab, seed=1),
        args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok, callbacks=[timer],
    )  # fmt: skip
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history
               if "completions/mean_length" in h]  # fmt: skip
    trl_tokens = sum(lengths[1:]) * batch_size if len(lengths) > 1 else float("nan")
    # tokens per step over the median step time (robust to other work on the machine)
    ours_rate = ours_tokens / len(ours_times) / statistics.median(ours_times)
    trl_rate = trl_tokens / len(timer.times[1:]) / statistics.median(timer.times[1:])
    import trl

    fig = Figure(
        "TRL", f"on-policy distill step tokens/s vs TRL {trl.__version__} DistillationTrainer",
        ours_rate, trl_rate, "tok/s",
        "sample + teacher top-k score + MiniLLM update", "DistillationTrainer(beta=1.0)",
        ">= 1.0x",
        f"llama {shape[0]}x{shape[1]} student and teacher on {device}, batch {batch_size}, <= {new_tokens} completion "
        "tokens, one optimizer step per generated batch, first step excluded, tokens per step over the median step time. Both include "
        "student generation, the teacher pass and the student update; TRL matches the "
        "teacher's full-vocabulary distribution (generalised JSD with beta=1, i.e. reverse "
        "KL), ours the teacher's log-probs on the student's top-k support (the message a "
        "teacher sends in a federation). Tokens: completion tokens trained on",
    )  # fmt: skip
    return [fig], {"ours_tok_s": ours_rate, "trl_tok_s": trl_rate}
