"""adapter_config.json allowlist and the structural checks of the LoRA tensors
(names, layers, shapes, ranks) against the served base model.

Only plain LoRA on the seven Llama linears is accepted: every PEFT option that changes
the forward pass (DoRA, aLoRA, QALoRA, layer replication, bias training, extra trainable
modules or tokens) fails, because Bastion cannot serve it faithfully and cannot vet it.
Regex patterns in the config (string target_modules, regex rank_pattern keys) are never
evaluated (catastrophic backtracking); the tensors themselves are checked instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

LORA_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
EMBEDDING_NAMES = {"embed_tokens", "lm_head", "embed_in", "embed_out", "wte", "wpe", "shared", "word_embeddings"}
NON_LINEAR_NAMES = {"input_layernorm", "post_attention_layernorm", "norm", "rotary_emb", "act_fn",
                    "self_attn", "mlp", "layers", "model"}
PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")  # PEFT's default for llama when target_modules is unset

TENSOR_RE = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d{1,6})\.(self_attn|mlp)\."
                       r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)\.weight$")
PLAIN_PATTERN_RE = re.compile(r"^[A-Za-z0-9_.]+$")

# key -> (values that make the option inert, severity otherwise, check, why)
_FAIL_UNLESS_INERT = {
    "auto_mapping": ("config.code_hook", "auto_mapping makes AutoPeftModel import a Python class"),
    "megatron_config": ("config.code_hook", "megatron_config makes PEFT import the module named by megatron_core"),
    "modules_to_save": ("config.modules_to_save", "modules_to_save ships full weights that replace base modules"),
    "trainable_token_indices": ("config.weight_replacement", "trainable_token_indices replaces embedding rows"),
    "layer_replication": ("config.unsupported", "layer_replication rewires the base model's layers"),
    "target_parameters": ("config.unsupported", "target_parameters (LoRA on raw parameters) is not supported"),
    "use_dora": ("config.unsupported", "DoRA (magnitude vectors) is not supported"),
    "lora_bias": ("config.weight_replacement", "lora_bias adds a trained bias outside the low-rank update"),
    "alora_invocation_tokens": ("config.unsupported", "activated LoRA (switches on after invocation tokens) "
                                                      "is not supported"),
    "use_qalora": ("config.unsupported", "QA-LoRA is not supported"),
    "use_bdlora": ("config.unsupported", "block-diagonal LoRA is not supported"),
    "arrow_config": ("config.unsupported", "Arrow routing is not supported"),
    "monteclora_config": ("config.unsupported", "MonteCLoRA is not supported"),
    "velora_config": ("config.unsupported", "VeLoRA is not supported"),
    "kasa_config": ("config.unsupported", "KaSA is not supported"),
}
_WARN_UNLESS_INERT = {  # initialisation-only options: harmless at inference unless they expect a modified base
    "loftq_config": "LoftQ adapters expect a LoftQ-quantised base, not the served one",
    "eva_config": "EVA initialisation setting (inert at inference)",
    "corda_config": "CorDA adapters may expect a residual (modified) base",
    "astra_config": "Astra adapters may expect a residual (modified) base",   # peft 0.22 writes it (null)
    "lora_ga_config": "LoRA-GA initialisation setting (inert at inference)",
}
_FREE_KEYS = {  # known, type-checked or harmless
    "peft_type", "task_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path", "bias",
    "fan_in_fan_out", "inference_mode", "init_lora_weights", "lora_dropout", "rank_pattern", "alpha_pattern",
    "layers_to_transform", "layers_pattern", "exclude_modules", "revision", "peft_version", "use_rslora",
    "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config", "enable_lora",
    "merge_weights", "lora_nums",
}
KNOWN_KEYS = set(_FAIL_UNLESS_INERT) | set(_WARN_UNLESS_INERT) | _FREE_KEYS
HOOK_TOKENS = {"remote", "trust", "code", "class", "cls", "module", "import", "library", "lib", "callable", "hook",
               "factory", "target", "plugin", "script", "exec", "eval", "pickle", "loader", "func", "function", "fn"}
CODE_VALUE_RE = re.compile(r"__\w+__|\bimport\s+\w|\b(eval|exec|compile|getattr|__import__)\s*\(|\bos\.(system|popen)"
                           r"|\bsubprocess\b|\bbuiltins\b|^\s*[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*\s*$")
DOTTED_PY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*){2,}$")
SAFE_INIT = (True, False, "gaussian", "true", "false")


def _inert(v) -> bool:
    return v is None or v is False or v == {} or v == [] or v == ""


@dataclass
class LoraSpec:
    """What the config says, reduced to what the checks need."""
    r: int | None = None
    alpha: float | None = None
    rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)    # plain (non-regex) keys only
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    pattern_ranks: set[int] = field(default_factory=set)         # values of regex keys (not evaluated)
    pattern_alphas: set[float] = field(default_factory=set)
    targets: list[str] | None = None       # list entries; None = any linear (all-linear / regex / unknown)
    exclude: list[str] = field(default_factory=list)
    layers: set[int] | None = None         # layers_to_transform

    def _match(self, pattern: dict, path: str):
        for k, v in pattern.items():
            if path == k or path.endswith("." + k):
                return v
        return None

    def rank_for(self, path: str) -> tuple[int | None, set[int]]:
        """(expected rank, other ranks acceptable because a regex key might match)."""
        r = self._match(self.rank_pattern, path)
        if r is not None:
            return r, set()
        return self.r, set(self.pattern_ranks)

    def scale_for(self, path: str, rank: int) -> float:
        alpha = self._match(self.alpha_pattern, path)
        if alpha is None:
            alpha = self.alpha if self.alpha is not None else 8.0  # PEFT's default lora_alpha
        return alpha / (math.sqrt(rank) if self.rslora else rank)


def module_path(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{LORA_MODULES[module]}.{module}"


def _entry_matches(entry: str, path: str) -> bool:
    return path == entry or path.endswith("." + entry)


def check_config(cfg: dict, base, add, *, scale_warn: float = 64.0) -> LoraSpec:
    """Allowlist of adapter_config.json; `add(check, severity, message, **details)`."""
    spec = LoraSpec()
    for key, value in cfg.items():
        if key in _FAIL_UNLESS_INERT and not _inert(value):
            check, why = _FAIL_UNLESS_INERT[key]
            add(check, "fail", f"config sets {key}: {why}", key=key, value=_short(value))
        elif key in _WARN_UNLESS_INERT and not _inert(value):
            add("config.init", "warn", f"config sets {key}: {_WARN_UNLESS_INERT[key]}", key=key)
        elif key not in KNOWN_KEYS:
            if _hook_key(key) or _code_like(value, dotted=True):
                add("config.code_hook", "fail", f"config key {key!r} looks like a code/import hook", key=key,
                    value=_short(value))
            else:
                add("config.unknown_key", "warn", f"unknown config key {key!r} (not a PEFT LoRA option)", key=key)
        if key != "base_model_name_or_path" and _code_like(value, dotted=False):
            add("config.code_hook", "fail", f"config value of {key!r} contains code-like text", key=key,
                value=_short(value))
    if cfg.get("peft_type") != "LORA":
        add("config.peft_type", "fail", f"peft_type is {cfg.get('peft_type')!r}; only LORA is accepted")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        add("config.task_type", "warn", f"task_type {cfg.get('task_type')!r} (expected CAUSAL_LM)")
    if cfg.get("bias", "none") != "none":
        add("config.weight_replacement", "fail",
            f"bias={cfg.get('bias')!r}: the adapter trains base biases (a weight change outside LoRA)")
    if cfg.get("fan_in_fan_out"):
        add("config.unsupported", "warn", "fan_in_fan_out=true is meant for Conv1D models, not Llama linears")
    if cfg.get("megatron_core", "megatron.core") not in (None, "megatron.core"):
        add("config.code_hook", "fail", f"megatron_core names a Python module: {cfg['megatron_core']!r}")
    init = cfg.get("init_lora_weights", True)
    if init not in SAFE_INIT:
        add("config.init", "warn", f"init_lora_weights={init!r}: such adapters may expect a modified base "
            "(PiSSA/OLoRA/LoftQ residual) unless converted before saving")
    # rank and alpha
    r = cfg.get("r", 8)
    if not _is_int(r) or not 1 <= r:
        add("config.rank", "fail", f"r={r!r} is not a positive integer")
    else:
        spec.r = r
    alpha = cfg.get("lora_alpha", 8)
    if not _is_num(alpha) or not math.isfinite(alpha) or alpha <= 0:
        add("config.lora_alpha", "fail", f"lora_alpha={alpha!r} must be a finite positive number")
    else:
        spec.alpha = float(alpha)
    spec.rslora = bool(cfg.get("use_rslora", False))
    for key, dst, regex_vals, typ in (("rank_pattern", spec.rank_pattern, spec.pattern_ranks, "rank"),
                                      ("alpha_pattern", spec.alpha_pattern, spec.pattern_alphas, "alpha")):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict):
            add("config.rank", "fail", f"{key} must be a mapping")
            continue
        for k, v in pat.items():
            ok = _is_int(v) and v >= 1 if typ == "rank" else _is_num(v) and math.isfinite(v) and v > 0
            if not ok:
                add("config.rank" if typ == "rank" else "config.lora_alpha", "fail",
                    f"{key}[{k!r}]={v!r} is not a valid {typ}")
            elif PLAIN_PATTERN_RE.match(k):
                dst[k] = v
            else:
                regex_vals.add(v)
                add("config.pattern", "warn", f"{key} key {k!r} is a regular expression; not evaluated "
                    "(ranks/scales checked against the tensors instead)")
    if spec.r and spec.alpha:
        scales = [spec.scale_for("", spec.r)] + [a / (math.sqrt(spec.r) if spec.rslora else spec.r)
                                                  for a in spec.alpha_pattern.values()]
        if max(scales) >= scale_warn:
            add("config.lora_alpha", "warn", f"LoRA scale alpha/r = {max(scales):.3g} is unusually large",
                scale=max(scales))
    if cfg.get("lora_dropout", 0) is not None and not (_is_num(cfg.get("lora_dropout", 0))
                                                      and 0 <= cfg.get("lora_dropout", 0) < 1):
        add("config.unknown_key", "warn", f"lora_dropout={cfg.get('lora_dropout')!r} is not in [0, 1)")
    _targets(cfg, spec, base, add)
    _base_name(cfg, base, add)
    return spec


def _targets(cfg: dict, spec: LoraSpec, base, add) -> None:
    tm = cfg.get("target_modules")
    if tm is None:
        add("config.target_modules", "warn", "target_modules is unset (PEFT defaults to q_proj, v_proj)")
        spec.targets = list(PEFT_DEFAULT_TARGETS)
    elif isinstance(tm, str) and tm.lower() in ("all-linear", "all_linear"):
        spec.targets = None
    elif isinstance(tm, str):
        add("config.target_modules", "warn", "target_modules is a regular expression; not evaluated "
            "(each tensor is checked against the base instead)", pattern=_short(tm))
        spec.targets = None
    elif isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm):
        spec.targets = list(tm)
        num_layers = base.num_layers if base is not None else None
        for entry in tm:
            last = entry.rsplit(".", 1)[-1]
            if last in EMBEDDING_NAMES:
                add("config.weight_replacement", "fail",
                    f"target module {entry!r} is an embedding/lm_head (vocabulary-level replacement)", module=entry)
            elif last in NON_LINEAR_NAMES:
                add("config.target_modules", "fail", f"target module {entry!r} is not a linear layer", module=entry)
            elif last not in LORA_MODULES or (num_layers is not None and not any(
                    _entry_matches(entry, module_path(i, last)) for i in range(num_layers))):
                add("config.target_modules", "fail", f"target module {entry!r} does not exist in the base model",
                    module=entry)
            elif base is not None and base.shape(last) is None:
                add("config.target_modules", "fail", f"target module {entry!r} does not exist in the base model",
                    module=entry)
    else:
        add("config.target_modules", "fail", f"target_modules must be a list of names or a string: {_short(tm)}")
    ex = cfg.get("exclude_modules")
    if isinstance(ex, list):
        spec.exclude = [e for e in ex if isinstance(e, str)]
    ltt = cfg.get("layers_to_transform")
    if _is_int(ltt):
        spec.layers = {ltt}
    elif isinstance(ltt, list) and all(_is_int(v) for v in ltt):
        spec.layers = set(ltt)


def _base_name(cfg: dict, base, add) -> None:
    name = cfg.get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        add("config.base_model", "warn", "base_model_name_or_path is missing: the adapter does not say which "
            "model it was trained for")
        return
    if base is None:
        return
    how = base.match_name(name)
    if how == "exact":
        return
    if how == "path":
        add("config.base_model", "info", f"base_model_name_or_path {name!r} is a local path naming the served base "
            f"{base.name!r}")
    elif how == "namespace":
        add("config.base_model", "warn", f"base_model_name_or_path {name!r} has the served model's name under "
            f"another namespace; cannot confirm it is {base.name!r}")
    else:
        add("config.base_model", "fail", f"adapter was trained for {name!r}, but the served base is {base.name!r} "
            f"(accepted: {', '.join(base.aliases)})", expected=list(base.aliases), got=name)


def check_tensors(shapes: dict[str, tuple[int, ...]], spec: LoraSpec | None, base, add, *,
                  max_rank: int) -> dict[tuple[int, str], tuple[str, str, int]]:
    """Names, layers, pairs, shapes, ranks. Returns (layer, module) -> (A name, B name, rank)
    for every pair that is structurally sound (weight statistics use only those)."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    for name, shape in shapes.items():
        m = TENSOR_RE.match(name)
        if not m:
            low = name.lower()
            if any(e in low for e in EMBEDDING_NAMES) or "lora_embedding" in low:
                add("tensors.weight_replacement", "fail", f"tensor {name!r} touches embeddings/lm_head "
                    "(weight replacement outside LoRA)", tensor=name)
            elif "magnitude" in low:
                add("tensors.name", "fail", f"tensor {name!r} is a DoRA magnitude vector (unsupported)", tensor=name)
            else:
                add("tensors.name", "fail", f"tensor {name!r} is not a LoRA factor of a Llama linear "
                    "(expected ...model.layers.N.{self_attn,mlp}.<proj>.lora_{A,B}.weight)", tensor=name)
            continue
        layer, _, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if LORA_MODULES[module] != m.group(2):
            add("tensors.name", "fail", f"tensor {name!r}: {module} is not under {m.group(2)}", tensor=name)
            continue
        if base is not None and layer >= base.num_layers:
            add("tensors.layer", "fail", f"tensor {name!r}: layer {layer} out of range (base has "
                f"{base.num_layers} layers)", tensor=name, layer=layer)
            continue
        slot = found.setdefault((layer, module), {})
        if ab in slot:
            add("tensors.name", "fail", f"tensors {slot[ab]!r} and {name!r} both give lora_{ab} of "
                f"layers.{layer}.{module}", tensor=name)
            continue
        slot[ab] = name
    pairs: dict[tuple[int, str], tuple[str, str, int]] = {}
    for (layer, module), slot in sorted(found.items()):
        where = f"layers.{layer}.{module}"
        if set(slot) != {"A", "B"}:
            missing = "lora_B" if "A" in slot else "lora_A"
            add("tensors.pair", "fail", f"{where}: {missing} is missing", module=where)
            continue
        sa, sb = shapes[slot["A"]], shapes[slot["B"]]
        if len(sa) != 2 or len(sb) != 2:
            add("tensors.shape", "fail", f"{where}: LoRA factors must be 2-D, got A{list(sa)} B{list(sb)}",
                module=where)
            continue
        ra, rb = sa[0], sb[1]
        io = base.shape(module) if base is not None else None
        bad = []
        if io is not None and sa[1] != io[0]:
            bad.append(f"lora_A is {list(sa)}, expected [r, {io[0]}]")
        if io is not None and sb[0] != io[1]:
            bad.append(f"lora_B is {list(sb)}, expected [{io[1]}, r]")
        if bad:
            add("tensors.shape", "fail", f"{where}: {'; '.join(bad)} ({module} is {io[0]}->{io[1]} in the base)",
                module=where, A=list(sa), B=list(sb), expected_in_out=list(io))
            continue
        if ra != rb:
            add("tensors.rank", "fail", f"{where}: lora_A has rank {ra} but lora_B has rank {rb}", module=where)
            continue
        if not 1 <= ra <= max_rank:
            add("tensors.rank", "fail", f"{where}: rank {ra} outside [1, {max_rank}]", module=where)
            continue
        if io is not None and ra >= min(io):
            add("tensors.rank", "warn", f"{where}: rank {ra} >= min(in, out) = {min(io)}: a full-rank update "
                "that can replace the base weight outright", module=where, rank=ra)
        path = module_path(layer, module)
        if spec is not None:
            want, also = spec.rank_for(path)
            if want is not None and ra != want and ra not in also:
                add("tensors.rank", "fail", f"{where}: rank {ra} but the config says r={want}"
                    + (" (rank_pattern)" if spec._match(spec.rank_pattern, path) is not None else ""),
                    module=where, rank=ra, config_rank=want)
                continue
            if spec.targets is not None and not any(_entry_matches(t, path) for t in spec.targets):
                add("tensors.untargeted", "fail", f"{where}: weights for a module target_modules does not list "
                    "(PEFT would drop them, another loader might apply them)", module=where)
                continue
            if any(_entry_matches(e, path) for e in spec.exclude):
                add("tensors.untargeted", "fail", f"{where}: weights for a module exclude_modules excludes",
                    module=where)
                continue
            if spec.layers is not None and layer not in spec.layers:
                add("tensors.untargeted", "fail", f"{where}: layer {layer} is not in layers_to_transform",
                    module=where)
                continue
        pairs[(layer, module)] = (slot["A"], slot["B"], ra)
    if spec is not None and spec.targets is not None:
        present = {m for _, m in found}
        for entry in spec.targets:
            last = entry.rsplit(".", 1)[-1]
            if last in LORA_MODULES and last not in present:
                add("config.target_modules", "warn", f"target module {entry!r} has no weights in the file",
                    module=entry)
    return pairs


def _hook_key(key: str) -> bool:
    """Unknown keys whose name says code: trust_remote_code, auto_map, _target_, parent_library..."""
    flat = re.sub(r"[^a-z]", "", key.lower())
    tokens = set(re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1_\2", key).lower()))
    return "automap" in flat or "entrypoint" in flat or bool(tokens & HOOK_TOKENS)


def _code_like(value, *, dotted: bool, depth: int = 0) -> bool:
    if depth > 8:
        return False
    if isinstance(value, str):
        return bool(CODE_VALUE_RE.search(value)) or (dotted and bool(DOTTED_PY_RE.match(value)))
    if isinstance(value, dict):
        return any(_code_like(k, dotted=dotted, depth=depth + 1) or _code_like(v, dotted=dotted, depth=depth + 1)
                   for k, v in value.items())
    if isinstance(value, list):
        return any(_code_like(v, dotted=dotted, depth=depth + 1) for v in value)
    return False


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(value) -> str:
    s = repr(value)
    return s if len(s) <= 200 else s[:200] + "..."
