"""The training config: typed, validated, and its field docstrings are the reference in README.

A YAML file maps onto `TrainConfig`; `--set train.learning_rate=5e-4` overrides any field. Unknown
keys are errors that name the file and line and suggest the closest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraplex.errors import UserError
from loraplex.paths import check_name


class Strict(BaseModel):
    """A config section: unknown keys are errors, attribute docstrings are the help."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class DataConfig(Strict):
    path: str | None = None
    """Training data file (alpaca / messages / sharegpt JSON or JSONL, CSV/TSV, or dialogue text)."""
    format: Literal["auto", "alpaca", "messages", "sharegpt", "csv", "dialogue"] = "auto"
    """Data format; `auto` detects it from the extension and the first record."""
    eval_path: str | None = None
    """Separate evaluation file (same formats). Overrides `eval_ratio`."""
    eval_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the training records held out for evaluation loss (0 = none)."""
    question_column: str | None = None
    """CSV/TSV: column with the question (default: question, instruction, prompt, 问题 ...)."""
    answer_column: str | None = None
    """CSV/TSV: column with the answer (default: answer, output, response, 答案 ...)."""
    system_column: str | None = None
    """CSV/TSV: optional column with a per-row system prompt."""
    user_names: list[str] = []
    """Dialogue text: speaker names of the user (default: 用户, 客户, User, Q ...)."""
    assistant_names: list[str] = []
    """Dialogue text: speaker names of the assistant (default: 助手, 客服, Assistant, A ...)."""
    max_seq_length: int = Field(1024, ge=16)
    """Tokens per example (and per packed row); longer examples are truncated with a warning."""
    packing: bool = True
    """Pack several examples into one row (no padding; attention never crosses examples)."""
    train_on_prompt: bool = False
    """Also compute the loss on system and user tokens (default: assistant tokens only)."""
    redact: bool = False
    """Replace phone numbers, e-mails, ID and bank card numbers with placeholders before training."""
    skip_invalid: bool = False
    """Train on the valid records when some are invalid (default: refuse and list every bad one)."""


class LoraConfig(Strict):
    rank: int = Field(16, ge=1, le=1024)
    """LoRA rank r."""
    alpha: float = Field(32.0, gt=0)
    """LoRA alpha, 2 x rank unless given; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]) or `all-linear` (every linear layer but the output head)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""

    @model_validator(mode="before")
    @classmethod
    def _alpha_follows_rank(cls, data: Any) -> Any:
        # alpha = 2 x rank keeps the update's scale when only the rank is changed (as LLaMA-Factory's default)
        if isinstance(data, dict) and "alpha" not in data and isinstance(data.get("rank"), int):
            return {**data, "alpha": 2.0 * data["rank"]}
        return data

    def peft(self) -> Any:
        """This section as PEFT's LoraConfig, for a causal LM."""
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float alpha works and is allowed
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias=self.bias,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            task_type="CAUSAL_LM",
        )


class RetrievalConfig(Strict):
    """Retrieval-augmented training and serving (assistants/faq.py): the training Q&A becomes the
    adapter's own knowledge, stored with it; every training question is shown with the passages
    found for it and answered from them, and a request for the adapter is answered the same way."""

    enabled: bool = True
    """Train and answer with retrieval (single-turn Q&A records); false: plain LoRA SFT on the records."""
    top_k: int = Field(1, ge=1, le=8)
    """Passages put into each prompt. One: the 135M default base answers from the first passage
    anyway (85.7% of faq_large's unseen phrasings with 1, 86.3% with 2), and one passage after
    fixed instructions is a prefix the server's prefix cache holds after its first use, so
    retrieval adds ~10-20 ms to the first token instead of ~70 (bench/generalization.py). A larger
    base that reads several passages may do better with 2-4."""
    min_similarity: float = Field(0.5, ge=-1.0, le=1.0)
    """Passages less similar in meaning to the question than this (mean cosine with its question
    and with question + answer, built-in multilingual encoder) are not used, unless the question is
    closer to the best of them than to every built-in off-topic question (`offtopic_gate`); with none
    left, the base model answers."""
    offtopic_gate: bool = True
    """Also use the best passage under `min_similarity` when the question is closer to it than to every
    built-in off-topic question (a question that does not name the organisation, as its own staff
    ask, often scores under 0.5); false: `min_similarity` alone decides."""
    english_encoder: bool = True
    """A question in English letters (no Chinese, no accented letters) also compares its 8 best
    passages that are too with an English-only sentence encoder (all-MiniLM-L6-v2, installed by
    scripts/install.sh), ranking them by the mean of both encoders' similarities: 79% -> 86% of
    faq_large's English unseen phrasings found first. Only the order changes (the thresholds below
    are the multilingual encoder's); ~9 ms a question on one core. Without the package installed,
    the multilingual encoder ranks alone. Its similarity with the FAQ's organisation names taken out
    is also a second opinion for `refuse_below` on such questions (the larger of the two counts):
    faq_large's right answers refused 18 -> 14 of 300, unanswerable questions refused unchanged; and
    for the off-topic gate (a question closer to a pair than to every built-in off-topic question
    for either encoder passes): asked without the organisation's name, 27 -> 15 of faq_large's 300
    unseen phrasings left to the base model, general questions let through unchanged."""
    bilingual: bool = True
    """A question that mixes Chinese and English ("云杉酒店的 check-out time 是几点？") is also searched
    with its other-language words translated into the language of the FAQ pairs it asks about, with
    CC-CEDICT and towards the FAQ's own words (+ 退房), ranked by the mean of both: faq_large's unseen
    phrasings found first 272 -> 275 of 300 (with the English second opinion above). The dictionary is
    read on a version's first mixed question (~2.5 s, ~10 MB); questions in one language are searched
    as before."""
    spelling: bool = True
    """Correct a question's typos towards the FAQ's own words before searching: an English word in
    neither an English dictionary nor the FAQ becomes the FAQ's closest word ("brekfast" ->
    "breakfast"), a Chinese character that makes no word becomes the FAQ's character read the same
    way that completes one of its words ("退芳" -> 退房). faq_large's unseen phrasings found first:
    268 -> 272 of 300, refused 22 -> 18. The prompt keeps the question as typed."""
    refuse_below: float | None = Field(0.4, ge=-1.0, le=1.0)
    """Answer "I don't know" when the best passage, with the organisations the FAQ names taken out of it
    and of the question, is less similar than this: the question is about the organisation, not about
    anything the FAQ says ("Does Northwind Robotics provide free lunch?"), and would otherwise be
    answered from the closest passage. A question that names the organisation and finds no passage
    gets the same answer, not the base model's. Measured on both benchmark sets in
    docs/generalization.md; null: never refuse (and such questions go to the base model)."""
    noisy_copies: int = Field(1, ge=0, le=8)
    """Extra training copies of each question with typos, a dropped word or lower case (never new facts).
    One by default: without it the 135M adapter answered 8-10 of faq_large's Chinese or mixed unseen
    phrasings by repeating the question even with the right passage in its prompt; with it, none
    (the epochs default falls with it, so training time stays the same; docs/generalization.md)."""
    refusals: float = Field(0.0, ge=0.0, le=1.0)
    """Share of records also shown without their own passage, answered "I don't know"."""


class ParaphraseConfig(Strict):
    """Rewordings of each training question written by a teacher model (data/paraphrase.py): the
    adapter sees every fact asked several ways; answers stay verbatim. Kept, reviewable and
    editable, in $LORAPLEX_HOME/paraphrases/; the same data and teacher are never asked twice."""

    count: int = Field(0, ge=0, le=20)
    """Rewordings per training question (0: off)."""
    teacher: str = ""
    """OpenAI-compatible endpoint that writes them (e.g. http://127.0.0.1:8000/v1: vLLM, another
    `loraplex serve`, a provider); empty: the base model itself, locally."""
    teacher_model: str | None = None
    """The teacher's model (default: the first one it lists)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable with the teacher's API key."""


class TrainingConfig(Strict):
    epochs: float | None = Field(None, gt=0)
    """Passes over the training examples (ignored when max_steps is set); default 16, or with
    retrieval 4 / (1 + retrieval.noisy_copies): each record's question seen four times in some
    wording (2 with the default one noisy copy)."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to run; overrides epochs."""
    batch_size: int = Field(4, ge=1)
    """Rows per micro-batch (a packed row holds several examples)."""
    gradient_accumulation: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    learning_rate: float = Field(1e-3, gt=0)
    """Peak learning rate (AdamW)."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    """Fraction of the steps spent warming up linearly."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay on the LoRA weights."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in backward: far less activation memory, about a third more compute."""
    quantization_bit: Literal[4, 8] | None = None
    """QLoRA: hold the frozen base in 4-bit (or 8-bit) with bitsandbytes and train LoRA on top. CUDA only."""
    quantization_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: NF4 (the QLoRA paper's) or FP4."""
    double_quantization: bool = True
    """Quantise the 4-bit quantisation constants too (~0.4 bit/param saved)."""
    fsdp: bool = False
    """Under torchrun / accelerate launch: shard the frozen base over the processes (FSDP2) instead of a copy each."""
    deepspeed: str | None = None
    """Under torchrun / accelerate launch: a DeepSpeed JSON config (ZeRO-2/3, offload; see examples/deepspeed/)."""
    compile: bool = False
    """torch.compile the decoder: faster steps after a one-off compile (minutes on CPU; worth it on GPUs)."""
    seed: int = 42
    """Seed for data order, dropout and initialisation."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 where the hardware runs it faster (CPUs with AVX512-BF16/AMX, recent GPUs), else fp32."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to train; `auto` picks CUDA, then MPS, then CPU."""
    threads: int | None = Field(None, ge=1)
    """CPU threads for torch; unset: $LORAPLEX_THREADS or $OMP_NUM_THREADS if set, else measured while training (all
    cores, one fewer or half: whichever is fastest now, so a busy machine does not stall every op)."""
    eval_steps: int = Field(0, ge=0)
    """Evaluate every N steps (0: at the end of each epoch when there is eval data)."""
    save_steps: int = Field(50, ge=1)
    """Write a resumable checkpoint every N steps."""
    logging_steps: int = Field(1, ge=1)
    """Log metrics every N steps."""
    save_total_limit: int = Field(2, ge=1)
    """Checkpoints kept in the run directory (oldest removed first)."""
    early_stopping_patience: int = Field(0, ge=0)
    """Stop after N evaluations without improvement of `early_stopping_metric` (0: never)."""
    gen_eval_steps: int = Field(0, ge=0)
    """Every N steps, answer eval questions greedily and log exact/keyword match (0: off)."""
    early_stopping_metric: Literal["eval_loss", "gen_score"] = "eval_loss"
    """What early stopping watches: the eval loss, or the generation eval's score (needs gen_eval_steps)."""
    gen_eval_examples: int = Field(16, ge=1)
    """How many eval questions the generation eval answers (the first N of the eval split)."""
    gen_eval_max_tokens: int = Field(64, ge=1)
    """New tokens per answer in the generation eval."""

    @field_validator("early_stopping_metric")
    @classmethod
    def _gen_needs_steps(cls, v: str, info: Any) -> str:
        if v == "gen_score" and not info.data.get("gen_eval_steps"):
            raise ValueError("early_stopping_metric gen_score needs gen_eval_steps > 0 (how often to run it)")
        return v


def default_epochs(retrieval: bool, noisy_copies: int) -> float:
    """`train.epochs` when unset: 16 for plain SFT; with retrieval each record makes 1 + noisy_copies
    examples, shown 4 times in all (4 epochs without copies, 2 with the default one: the same steps)."""
    return 4.0 / (1 + noisy_copies) if retrieval else 16.0


class TrainConfig(Strict):
    """Everything `loraplex train` needs; resolved and stored in the adapter manifest."""

    name: str = "adapter"
    """Adapter name in the store; the result is registered as NAME@vN."""
    base: str = "smollm2-135m"
    """Base model: an embedded id (smollm2-135m), a Hugging Face model directory, or a .gguf file."""
    description: str = ""
    """Free text shown by `adapters list/show`."""
    owner: str = ""
    """Who owns this adapter (team or person)."""
    tags: list[str] = []
    """Labels for finding adapters."""
    data: DataConfig = DataConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    paraphrase: ParaphraseConfig = ParaphraseConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainingConfig = TrainingConfig()

    @property
    def epochs(self) -> float:
        if self.train.epochs is not None:
            return self.train.epochs
        return default_epochs(self.retrieval.enabled, self.retrieval.noisy_copies)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        try:
            return check_name(v)
        except UserError as e:
            raise ValueError(str(e)) from None


def _section_model(loc: tuple[Any, ...], root: type[BaseModel] = TrainConfig) -> type[BaseModel] | None:
    model: type[BaseModel] = root
    for key in loc:
        if isinstance(key, int):
            continue  # an item of a list: its model is the list's item type, found at the list's key
        field = model.model_fields.get(str(key))
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            ann = args[0]  # list[Item]
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _line_of(node: Any, loc: tuple[Any, ...]) -> int | None:
    """1-based YAML line of the key at `loc`, using the composed node tree."""
    line = None
    for key in loc:
        if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            return line
        for k, v in node.value:
            if k.value == str(key):
                line = k.start_mark.line + 1
                node = v
                break
        else:
            return line
    return line


def explain(err: ValidationError, source: str, node: Any, root: type[BaseModel] = TrainConfig) -> str:
    """A pydantic error on a YAML file as `file:line: field: what is wrong` (with the closest valid
    key for a typo): training configs, serve configs and assistants all report through it."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        line = _line_of(node, loc) if node is not None else None
        where = f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            section = _section_model(loc[:-1], root)
            options = list(section.model_fields) if section else []
            close = difflib.get_close_matches(str(loc[-1]), options, n=1)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"{where}: unknown key {dotted!r}{hint} (valid here: {', '.join(options)})")
        else:
            lines.append(f"{where}: {dotted}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_yaml(path: Path) -> tuple[Any, Any]:
    """A YAML file's data and its node tree (for line numbers in errors)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    try:
        return yaml.safe_load(text) or {}, yaml.compose(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set expects key=value (e.g. train.learning_rate=5e-4), got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, extra: dict[str, Any] | None = None
) -> TrainConfig:
    """Read YAML (optional), apply `extra` (nested dict from CLI flags) and `--set` overrides, validate."""
    raw: dict[str, Any] = {}
    node = None
    source = "<command line>"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}") from None
        try:
            node = yaml.compose(text)
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}:1: the config must be a mapping of keys to values")
        # Relative data paths are relative to the config file, like LLaMA-Factory's dataset_dir.
        data = raw.get("data")
        if isinstance(data, dict):
            for key in ("path", "eval_path"):
                if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                    candidate = path.parent / data[key]
                    if candidate.exists():
                        data[key] = str(candidate)
        train = raw.get("train")
        if isinstance(train, dict) and isinstance(train.get("deepspeed"), str):
            candidate = path.parent / train["deepspeed"]
            if not Path(train["deepspeed"]).is_absolute() and candidate.exists():
                train["deepspeed"] = str(candidate)
    for section, values in (extra or {}).items():
        if isinstance(values, dict):
            raw.setdefault(section, {})
            raw[section].update(values)
        else:
            raw[section] = values
    for item in overrides or []:
        keys, value = parse_override(item)
        target = raw
        for k in keys[:-1]:
            target = target.setdefault(k, {})
            if not isinstance(target, dict):
                raise UserError(f"--set {item}: {k} is not a section")
        target[keys[-1]] = value
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(explain(e, source, node)) from None


def config_reference() -> str:
    """Markdown table of every config key, in the order of `TrainConfig`, from the fields' types,
    defaults and docstrings: docs/config.md holds it, and tests/test_docs.py checks it is current
    (regenerate with `python scripts/config_reference.py`)."""
    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                walk(f.annotation, f"{prefix}{name}.")
                continue
            default = "null" if f.default is None else f.default
            meaning = " ".join((f.description or "").split())  # one line: docstrings wrap
            out.append(f"| `{prefix}{name}` | `{default}` | {meaning} |")

    walk(TrainConfig, "")
    return "| key | default | meaning |\n|---|---|---|\n" + "\n".join(out)
