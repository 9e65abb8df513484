"""Instruction templates for instruction tuning: the paper's Table 5 (appendix, PDF p. 17), one list per task.

During training every sample draws one template of its task uniformly at random (paper §2.3), and the resulting
instruction goes to both the Q-Former and the LLM. Some templates ask for a *short* answer and some do not, so that
the model does not learn to answer every question briefly.

Tasks (aliases in `TASK_ALIASES`):
- "caption": 13 templates; the target is the caption. No `{Question}` slot.
- "vqa": 10 templates with a `{Question}` slot; the target is the answer.
- "vqg": 6 templates with an `{Answer}` slot; the target is the *question* (question generation).
- "instruction": no template: the record's own instruction is the prompt (LLaVA-Instruct-150K is already in
  instruction form, and the paper gives it no templates).

Extras the paper describes:
- OCR tokens (TextCaps, OCR-VQA, TextVQA): `OCR tokens: {tokens}. ` is put right after the image, i.e. in front of
  the instruction, with at most 30 tokens joined by ", " (LAVIS `blip2_vicuna_instruct.py`, `', '.join(ocr[:30])`).
- Options (multiple-choice data such as A-OKVQA or IconQA): written into the question as
  `{question} Options: (a) x (b) y.`, the way LAVIS renders choices (`(a) x (b) y`), so every VQA template works.

Nothing here is lower-cased or stripped of punctuation (X-InstructBLIP's processor lower-cases; the paper's
InstructBLIP does not).
"""

from __future__ import annotations

import random
import string

# the paper's zero-shot captioning instruction (appendix E, NoCaps and Flickr30K), also one of the training templates;
# the default of `caption` in the API, the CLI and the server
CAPTION_PROMPT = "A short image description:"

CAPTION_TEMPLATES: tuple[str, ...] = (
    "A short image caption:",
    CAPTION_PROMPT,
    "A photo of",
    "An image that shows",
    "Write a short description for the image.",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)

VQA_TEMPLATES: tuple[str, ...] = (
    "{Question}",
    "Question: {Question}",
    "{Question} A short answer to the question is",
    "Q: {Question} A:",
    "Question: {Question} Short answer:",
    "Given the image, answer the following question with no more than three words. {Question}",
    "Based on the image, respond to this question with a short answer: {Question}. Answer:",
    "Use the provided image to answer the question: {Question} Provide your answer as short as possible:",
    'What is the answer to the following question? "{Question}"',
    'The question "{Question}" can be answered using the image. A short answer is',
)

VQG_TEMPLATES: tuple[str, ...] = (
    "Given the image, generate a question whose answer is: {Answer}. Question:",
    "Based on the image, provide a question with the answer: {Answer}. Question:",
    'Given the visual representation, create a question for which the answer is "{Answer}".',
    "From the image provided, craft a question that leads to the reply: {Answer}. Question:",
    "Considering the picture, come up with a question where the answer is: {Answer}.",
    "Taking the image into account, generate an question that has the answer: {Answer}. Question:",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": CAPTION_TEMPLATES,
    "vqa": VQA_TEMPLATES,
    "vqg": VQG_TEMPLATES,
    "instruction": (),
}

TASK_ALIASES: dict[str, str] = {
    "caption": "caption", "captioning": "caption", "image_captioning": "caption",
    "vqa": "vqa", "qa": "vqa", "question_answering": "vqa", "ocr_vqa": "vqa", "knowledge_vqa": "vqa",
    "vqg": "vqg", "question_generation": "vqg",
    "instruction": "instruction", "llava": "instruction", "conversation": "instruction", "none": "instruction",
}

MAX_OCR_TOKENS = 30  # LAVIS: ocr_tokens[:30]
OPTION_LETTERS = string.ascii_lowercase


def canonical_task(task: str) -> str:
    """The task name used in `TEMPLATES` for `task` or one of its aliases; ValueError for an unknown task."""
    key = str(task).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in TASK_ALIASES:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASK_ALIASES))}")
    return TASK_ALIASES[key]


def render_options(options: list[str]) -> str:
    """`["cat", "dog"]` -> `"(a) cat (b) dog"` (LAVIS's rendering of multiple-choice options)."""
    if len(options) > len(OPTION_LETTERS):
        raise ValueError(f"at most {len(OPTION_LETTERS)} options are supported, got {len(options)}")
    return " ".join(f"({OPTION_LETTERS[i]}) {option}" for i, option in enumerate(options))


def ocr_prefix(ocr_tokens: list[str] | None) -> str:
    """`OCR tokens: a, b, c. ` for up to 30 tokens; "" without OCR tokens."""
    tokens = [str(t) for t in (ocr_tokens or []) if str(t).strip()][:MAX_OCR_TOKENS]
    return f"OCR tokens: {', '.join(tokens)}. " if tokens else ""


def build_instruction(
    task: str,
    rng: random.Random,
    question: str | None = None,
    answer: str | None = None,
    instruction: str | None = None,
    ocr_tokens: list[str] | None = None,
    options: list[str] | None = None,
    template: str | None = None,
) -> str:
    """The instruction for one sample: a template of `task` drawn with `rng` (or the given `template`), filled in.

    `question`: the VQA question (required for "vqa"; for "vqg" it is the target, not part of the prompt).
    `answer`: for "vqg", the answer the generated question must have. `instruction`: the prompt for the
    "instruction" task. `ocr_tokens`, `options`: see the module docstring.
    """
    task = canonical_task(task)
    if task == "instruction":
        if not instruction:
            raise ValueError("an 'instruction' record needs a non-empty instruction")
        text = instruction.strip()
        if options:
            text = f"{text} Options: {render_options(options)}."
        return ocr_prefix(ocr_tokens) + text
    if template is None:
        template = rng.choice(TEMPLATES[task])
    if task == "vqa":
        if not question:
            raise ValueError("a 'vqa' record needs a non-empty question")
        q = question.strip()
        if options:
            q = f"{q} Options: {render_options(options)}."
        text = template.replace("{Question}", q)
    elif task == "vqg":
        if not answer:
            raise ValueError("a 'vqg' record needs the answer the question is about")
        text = template.replace("{Answer}", answer.strip())
    else:
        text = template
    return ocr_prefix(ocr_tokens) + text
