"""Domain corpora for the transformer substrate: synthetic domain languages with exact entropy
floors, and real text folders with a locally trained BPE tokenizer.

Synthetic domain languages
--------------------------
M domains come from the same task generator as the analytic sandbox (`sandbox.tasks.make_task`):
domain m owns a true low-rank update ``D_m = U_m V_m`` (d x d, rank r*, unit Frobenius norm, with
an optional shared component ``overlap``). The V tokens are split into C equal clusters by a fixed
random map ``cluster(v)``; the hidden state of the language is the cluster of the previous token.
With fixed random embeddings ``E (C, d)`` for clusters and ``F (V, d)`` for tokens (entries N(0, 1))
the next-token distribution of domain m is

    logit_m(v | c) = shared_scale * G[c, v] - zipf * log(1 + rank(v)) + domain_scale * E_c^T D_m F_v
    P_m(v | c)     = softmax_v(logit_m(v | c) / temperature)

where ``G (C, V)`` is a shared N(0, 1) table (structure common to every domain) and ``rank(v)`` a
fixed random ranking of the tokens (a Zipf-like unigram tilt). Because ``||D_m||_F = 1`` the domain
term ``E_c^T D_m F_v`` has unit variance, so ``domain_scale`` is measured in logits.

Each domain is therefore a first-order Markov chain on tokens whose transition rows depend on the
previous token only through its cluster. Its entropy rate is exact:

    H_m = sum_c pi_m(c) H(P_m(. | c)),    pi_m = stationary law of the cluster chain
    T_m[c, c'] = sum_{v : cluster(v) = c'} P_m(v | c)   (C x C, strictly positive, so primitive)

Every window starts from the stationary token law ``pi_m @ P_m``, so every target token of every
window has expected NLL exactly H_m under the true model, and any model's expected cross-entropy
on domain m is at least H_m (Gibbs). H_m is the floor that per-domain log-PPL is reported against.
Cost: C x V per domain (C = 256, V = 32,000 is 8M entries, fine).

Sampling is vectorised over windows: each step draws ``u ~ U[0, 1)`` per window and inverts the
row CDF with one `torch.searchsorted` on the C rows laid end to end (row c shifted by +c), so no
per-row gather of a (windows, V) matrix is needed.

Real text
---------
`load_text_domains(dir, vocab, seq_len)` reads one subfolder per domain (``*.txt`` files, sorted),
trains a byte-level BPE tokenizer (HuggingFace ``tokenizers``) on all of it with the preset's
vocabulary size, tokenises each domain into one stream (documents separated by ``<|endoftext|>``),
cuts it into non-overlapping windows of ``seq_len + 1`` tokens and holds out the last
``heldout_frac`` of each domain's windows. Real text has no known floor (NaN).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sandbox.errors import BadInput, check, require
from sandbox.identity import identity, key
from sandbox.results import atomic_write_bytes, atomic_write_json, damaged
from sandbox.streams import Purpose, generator
from sandbox.tasks import TaskSpec, make_task

# Stream offsets for the user seed (sandbox.tasks uses 0..2).
SPLITS = ("train", "heldout")
EOT = "<|endoftext|>"


@dataclass(frozen=True)
class CorpusConfig:
    """Synthetic domain languages. Field names are CLI flags (``domain_scale`` is ``--domain-scale``)."""

    domains: int = 4
    """M: number of domain languages."""
    vocab: int = 256
    """V: vocabulary size (must equal the model's)."""
    clusters: int = 32
    """C: number of token clusters (hidden states of the Markov chain)."""
    dim: int = 32
    """d: dimension of the task's true updates and of the fixed cluster/token embeddings."""
    true_rank: int = 2
    """r*: rank of each domain's true update D_m."""
    overlap: float = 0.0
    """o in [0, 1]: shared component of the domains' true updates (as in `sandbox.tasks`)."""
    domain_scale: float = 2.0
    """beta: logit scale of the per-domain low-rank term (0 makes every domain the same language)."""
    shared_scale: float = 1.5
    """Logit scale of the shared cluster-by-token table G."""
    zipf: float = 0.5
    """Strength of the Zipf-like unigram tilt ``-zipf * log(1 + rank(v))``."""
    temperature: float = 1.0
    """Logits are divided by this before the softmax."""
    seq_len: int = 64
    """T: model context; windows hold T + 1 tokens (inputs and shifted targets)."""
    train_windows: int = 512
    """Training windows per domain."""
    heldout_windows: int = 64
    """Held-out windows per domain."""
    seed: int = 0
    """Seed of the task, the language tables and the samples."""

    def __post_init__(self) -> None:
        _int(self.domains, "domains", 1, 256)
        _int(self.vocab, "vocab", 4, 1 << 20)
        _int(self.clusters, "clusters", 1, self.vocab)
        _int(self.dim, "dim", 2, 4096)
        _int(self.true_rank, "true_rank", 1, self.dim)
        require(_num(self.overlap) and 0 <= self.overlap <= 1, "overlap", self.overlap, "a number in [0, 1]")
        for name in ("domain_scale", "shared_scale", "zipf"):
            v = getattr(self, name)
            require(_num(v) and 0 <= v <= 100, name, v, "a number in [0, 100]")
        check(_num(self.temperature) and 0.01 <= self.temperature <= 100, "temperature", self.temperature,
                "a number in [0.01, 100]")
        _int(self.seq_len, "seq_len", 1, 1 << 16)
        _int(self.train_windows, "train_windows", 1, 1 << 24)
        _int(self.heldout_windows, "heldout_windows", 1, 1 << 24)
        _int(self.seed, "seed", 0, 2**62)


def _num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _int(x: object, name: str, lo: int, hi: int) -> None:
    require(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi, name, x, f"an integer in [{lo}, {hi}]")


@dataclass(frozen=True)
class Language:
    """The exact generative model of the synthetic domains.

    Attributes:
        cluster_of: ``(V,)`` long, cluster of each token.
        logp: ``(M, C, V)`` float64 log P_m(v | c).
        stationary: ``(M, C)`` float64 stationary cluster law pi_m.
        entropy_rate: ``(M,)`` float64 exact H_m in nats per token.
    """

    cluster_of: torch.Tensor
    logp: torch.Tensor
    stationary: torch.Tensor
    entropy_rate: torch.Tensor
    tables: dict = field(default_factory=dict, compare=False, repr=False)
    """Domain -> its sampling tables (`sampling_tables`), built on first use."""

    def token_stationary(self, m: int) -> torch.Tensor:
        """Stationary token law of domain m: ``pi_m @ P_m`` -> ``(V,)`` float64."""
        return self.stationary[m] @ self.logp[m].exp()

    def blind_excess(self) -> torch.Tensor:
        """How far apart the domains are: ``(M,)`` extra nats per token, on each domain, of the best
        domain-blind first-order predictor (one that sees only the previous token's cluster).

        For the balanced objective that predictor is ``Q(v | c) = sum_m pi_m(c) P_m(v | c) / sum_m pi_m(c)``
        and its excess on domain m is ``sum_c pi_m(c) KL(P_m(. | c) || Q(. | c))``. A model that infers the
        domain from longer context can beat it; a model that cannot sits at ``floor + blind_excess``.
        """
        P = self.logp.exp()                                                 # (M, C, V)
        w = self.stationary / self.stationary.sum(0, keepdim=True)          # (M, C) domain posterior per cluster
        logq = torch.log((w[:, :, None] * P).sum(0))                        # (C, V)
        kl = (P * (self.logp - logq)).sum(-1)                               # (M, C)
        return (self.stationary * kl).sum(-1)

    def nll(self, m: int, windows: torch.Tensor) -> torch.Tensor:
        """True-model NLL of every target token: windows ``(N, T+1)`` -> ``(N, T)`` float64."""
        prev = self.cluster_of[windows[:, :-1].long()]                  # (N, T) clusters
        return -self.logp[m][prev, windows[:, 1:].long()]                # (N, T)


def stationary_law(T: torch.Tensor, tol: float = 1e-15, max_iter: int = 100_000) -> torch.Tensor:
    """Stationary distribution of a row-stochastic, strictly positive matrix T ``(C, C)``.

    Power iteration ``pi <- pi T`` in float64 until the L1 change is below `tol`.
    """
    pi = torch.full((T.shape[0],), 1.0 / T.shape[0], dtype=torch.float64)
    T = T.double()
    for _ in range(max_iter):
        new = pi @ T
        new = new / new.sum()
        if (new - pi).abs().sum() < tol:
            return new
        pi = new
    return pi


def build_language(cfg: CorpusConfig) -> Language:
    """The exact per-domain transition tables and entropy rates (see the module docstring)."""
    M, V, C, d = cfg.domains, cfg.vocab, cfg.clusters, cfg.dim
    task = make_task(TaskSpec(domains=M, slots=M, dim=d, rank=cfg.true_rank, true_rank=cfg.true_rank,
                              overlap=float(cfg.overlap)), [cfg.seed])
    U, Vf = task.U[0].double(), task.V[0].double()                     # (M, d, r*), (M, r*, d)
    g = generator(Purpose.LANGUAGE, cfg.seed)
    cluster_of = torch.empty(V, dtype=torch.long)
    cluster_of[torch.randperm(V, generator=g)] = torch.arange(V) % C    # balanced clusters
    rank = torch.randperm(V, generator=g).double()                      # Zipf rank of each token
    E = torch.randn(C, d, generator=g, dtype=torch.float64)
    F = torch.randn(V, d, generator=g, dtype=torch.float64)
    G = torch.randn(C, V, generator=g, dtype=torch.float64)
    base = cfg.shared_scale * G - cfg.zipf * torch.log1p(rank)          # (C, V)
    dom = (E @ U) @ (Vf @ F.T)                                          # (M, C, r*) @ (M, r*, V) -> (M, C, V)
    logp = torch.log_softmax((base + cfg.domain_scale * dom) / cfg.temperature, dim=-1)   # (M, C, V)
    P = logp.exp()
    onehot = torch.zeros(V, C, dtype=torch.float64)
    onehot[torch.arange(V), cluster_of] = 1.0
    trans = P @ onehot                                                  # (M, C, C) cluster chain
    pi = torch.stack([stationary_law(trans[m]) for m in range(M)])       # (M, C)
    H_c = -(P * logp).sum(-1)                                           # (M, C) row entropies
    return Language(cluster_of=cluster_of, logp=logp, stationary=pi, entropy_rate=(pi * H_c).sum(-1))


def sampling_tables(lang: Language, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain m's inverse-CDF tables, cached on `lang`: the row CDFs laid end to end ``(C*V,)`` (row c
    shifted by +c) and the stationary token CDF ``(V,)``, both float64 with last entries exactly 1."""
    if m not in lang.tables:
        P = lang.logp[m].exp()                                          # (C, V)
        C = P.shape[0]
        cdf = P.cumsum(-1)
        cdf = cdf / cdf[:, -1:]                                         # last entry exactly 1
        c0 = lang.token_stationary(m).cumsum(0)
        lang.tables[m] = ((cdf + torch.arange(C, dtype=torch.float64)[:, None]).reshape(-1), c0 / c0[-1])
    return lang.tables[m]


def sample_windows(lang: Language, m: int, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Draw n independent windows of `length` tokens from domain m, started from stationarity.

    Returns ``(n, length)`` int32. Inverse-CDF sampling on the row CDFs laid end to end: row c of
    ``cdf (C, V)`` is shifted by +c, so ``searchsorted(cdf_flat, c + u)`` lands in row c.
    """
    flat, c0 = sampling_tables(lang, m)
    V = lang.logp.shape[-1]
    out = torch.empty(n, length, dtype=torch.long)
    u = torch.rand(length, n, generator=generator, dtype=torch.float64)     # (length, n): contiguous rows
    out[:, 0] = torch.searchsorted(c0, u[0], right=True).clamp_(max=V - 1)
    for t in range(1, length):
        c = lang.cluster_of[out[:, t - 1]]                              # (n,)
        idx = torch.searchsorted(flat, c.double() + u[t], right=True)
        out[:, t] = (idx - c * V).clamp_(0, V - 1)
    return out.to(torch.int32)


@dataclass
class Corpus:
    """Per-domain token windows and floors; the common input of pretraining and evaluation.

    Attributes:
        names: domain names (``domain0``.. or the real text subfolders).
        train, heldout: one ``(N_m, T+1)`` int32 tensor per domain.
        floors: ``(M,)`` float64 entropy rate per domain in nats (NaN when unknown).
        vocab, seq_len: sizes the model must match.
        key: a hash that identifies the data (used in downstream cache keys).
        config: the JSON-able description (the `CorpusConfig` or the real-text settings).
        language: the exact generator for synthetic corpora, else None.
        tokenizer: the BPE tokenizer for real text, else None.
    """

    names: tuple[str, ...]
    train: list[torch.Tensor]
    heldout: list[torch.Tensor]
    floors: torch.Tensor
    vocab: int
    seq_len: int
    key: str
    config: dict = field(default_factory=dict)
    language: Language | None = None
    tokenizer: object | None = None

    @property
    def domains(self) -> int:
        return len(self.names)

    def split(self, split: str) -> list[torch.Tensor]:
        check(split in SPLITS, "split", split, "one of " + ", ".join(SPLITS))
        return self.train if split == "train" else self.heldout

    def tokens(self, split: str) -> list[int]:
        """Target tokens per domain in a split (windows times seq_len)."""
        return [int(w.shape[0]) * self.seq_len for w in self.split(split)]

    def summary(self) -> list[dict]:
        """One row per domain: name, target tokens per split, floor (nats) and, for synthetic
        corpora, ``blind_excess`` (see `Language.blind_excess`)."""
        rows = [{"domain": n, "train_tokens": a, "heldout_tokens": b, "floor": float(f)}
                for n, a, b, f in zip(self.names, self.tokens("train"), self.tokens("heldout"), self.floors)]
        if self.language is not None:
            for row, gap in zip(rows, self.language.blind_excess().tolist()):
                row["blind_excess"] = gap
        return rows


def sample_batch(corpus: Corpus, split: str, batch: int, generator: torch.Generator,
                 domains: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of windows: inputs ``x (B, T)``, targets ``y (B, T)`` (x shifted by one), domains ``(B,)``.

    Domains are drawn uniformly (a balanced mixture: every domain equally likely, whatever its
    size) unless given as a ``(B,)`` long tensor; the window within a domain is uniform.
    """
    data = corpus.split(split)
    M = len(data)
    if domains is None:
        domains = torch.randint(M, (batch,), generator=generator)
    u = torch.rand(domains.shape[0], generator=generator, dtype=torch.float64)
    rows = []
    for i, m in enumerate(domains.tolist()):
        n = data[m].shape[0]
        rows.append(data[m][min(int(u[i] * n), n - 1)])
    w = torch.stack(rows).long()                                        # (B, T+1)
    return w[:, :-1], w[:, 1:], domains


def fresh_batch(corpus: Corpus, batch: int, generator: torch.Generator,
                domains: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like `sample_batch` on the training split, but every window is new: drawn from the synthetic
    domains' exact generator instead of picked from the fixed training windows, so no window is ever
    read twice. Domains are drawn uniformly unless given (as in `sample_batch`), then every window at
    once (`mixed_windows`); all from `generator`. Returns ``x (B, T)``, ``y (B, T)``, ``domains (B,)``."""
    check(corpus.language is not None, "train_data", "fresh", "windows for a real text corpus (fresh windows need "
          "the synthetic domains' generator)")
    if domains is None:
        domains = torch.randint(corpus.domains, (batch,), generator=generator)
    w = mixed_windows(corpus.language, domains, corpus.seq_len + 1, generator)   # (B, T+1)
    return w[:, :-1], w[:, 1:], domains


def mixed_windows(lang: Language, domains: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """One window of `length` tokens per entry of ``domains (n,)``, each from its domain's chain started
    from stationarity: `sample_windows` for every domain at once, the M domains' tables laid end to end
    (domain m's row c shifted by ``m C + c``, its first-token CDF by m), one `torch.searchsorted` per
    position. Returns ``(n, length)`` long."""
    M, C, V = lang.logp.shape
    if "mixed" not in lang.tables:
        parts = [sampling_tables(lang, m) for m in range(M)]
        lang.tables["mixed"] = (torch.cat([f + m * C for m, (f, _) in enumerate(parts)]),      # (M*C*V,)
                                torch.cat([c0 + m for m, (_, c0) in enumerate(parts)]))        # (M*V,)
    flat, first = lang.tables["mixed"]
    dom = domains.long()
    n = dom.shape[0]
    out = torch.empty(n, length, dtype=torch.long)
    u = torch.rand(length, n, generator=generator, dtype=torch.float64)                 # (length, n)
    out[:, 0] = (torch.searchsorted(first, dom.double() + u[0], right=True) - dom * V).clamp_(0, V - 1)
    for t in range(1, length):
        row = dom * C + lang.cluster_of[out[:, t - 1]]                                  # (n,) row of (domain, cluster)
        out[:, t] = (torch.searchsorted(flat, row.double() + u[t], right=True) - row * V).clamp_(0, V - 1)
    return out


def synthetic_corpus(cfg: CorpusConfig, cache_dir: str | Path | None = None) -> Corpus:
    """Build (or load from ``cache_dir/corpus-<hash>``) the synthetic domain corpus of `cfg`.

    The language tables are rebuilt from the seed (cheap); the sampled windows are cached as
    ``train.npy`` and ``heldout.npy`` (``(M, N, T+1)`` int32) with a ``meta.json``, written
    atomically. Same config -> bit-identical corpus, with or without the cache.
    """
    lang = build_language(cfg)
    name = key({"kind": "synthetic", **identity(cfg)})
    path = Path(cache_dir) / f"corpus-{name}" if cache_dir is not None else None
    splits: dict[str, torch.Tensor] = {}
    if path is not None and all((path / f"{s}.npy").exists() for s in SPLITS):
        for s in SPLITS:
            try:
                splits[s] = torch.from_numpy(np.load(path / f"{s}.npy"))
            except (ValueError, EOFError, OSError) as e:
                raise damaged(path / f"{s}.npy", "--cache", "cached corpus split", e,
                              "delete it and rerun to sample the corpus again") from None
    else:
        sizes = {"train": cfg.train_windows, "heldout": cfg.heldout_windows}
        for j, s in enumerate(SPLITS):
            splits[s] = torch.stack([
                sample_windows(lang, m, sizes[s], cfg.seq_len + 1,
                               generator(Purpose.CORPUS_SAMPLE, cfg.seed, m, j))
                for m in range(cfg.domains)])                           # (M, N, T+1)
        if path is not None:
            for s in SPLITS:
                buf = io.BytesIO()
                np.save(buf, splits[s].numpy())
                atomic_write_bytes(path / f"{s}.npy", buf.getvalue())
            atomic_write_json(path / "meta.json", {"config": asdict(cfg),
                                                   "floors": lang.entropy_rate.tolist()})
    names = tuple(f"domain{m}" for m in range(cfg.domains))
    return Corpus(names=names, train=list(splits["train"].unbind(0)), heldout=list(splits["heldout"].unbind(0)),
                  floors=lang.entropy_rate.clone(), vocab=cfg.vocab, seq_len=cfg.seq_len, key=name,
                  config={"kind": "synthetic", **asdict(cfg)}, language=lang)


def train_tokenizer(texts: Sequence[str], vocab: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on `texts` with at most `vocab` tokens (id 0 = EOT)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_text_domains(data_dir: str | Path, vocab: int, seq_len: int, heldout_frac: float = 0.1,
                      cache_dir: str | Path | None = None, flag: str = "--data") -> Corpus:
    """Real text: one subfolder of ``*.txt`` files per domain -> a `Corpus` (floors NaN).

    The tokenizer (byte-level BPE, `vocab` tokens at most, so always within the model's vocabulary)
    is trained on every domain's text; with `cache_dir` it and the windows are cached under
    ``cache_dir/text-<hash>`` keyed by the files' names, sizes and mtimes and the settings.
    """
    root = Path(data_dir)
    require(root.is_dir(), flag.lstrip("-"), str(data_dir), "a folder with one subfolder of .txt files per domain")
    check(0 < heldout_frac < 1, "heldout_frac", heldout_frac, "a number in (0, 1)")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*.txt")))
    if not subdirs:
        raise BadInput(flag, str(data_dir), "a folder with one subfolder of .txt files per domain")
    files = {d.name: sorted(d.glob("*.txt")) for d in subdirs}
    fingerprint = {n: [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in fs] for n, fs in files.items()}
    settings = {"kind": "text", "root": str(root.resolve()), "vocab": vocab, "seq_len": seq_len,
                "heldout_frac": heldout_frac}
    name = key({**settings, "files": fingerprint})
    path = Path(cache_dir) / f"text-{name}" if cache_dir is not None else None
    docs = {n: [f.read_text(encoding="utf-8", errors="replace") for f in fs] for n, fs in files.items()}
    from tokenizers import Tokenizer

    if path is not None and (path / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    else:
        tok = train_tokenizer([t for ds in docs.values() for t in ds], vocab)
        if path is not None:
            atomic_write_bytes(path / "tokenizer.json", tok.to_str().encode())
    eot = tok.token_to_id(EOT)
    train, held = [], []
    for name, ds in docs.items():
        ids: list[int] = []
        for enc in tok.encode_batch(ds):
            ids.extend(enc.ids + [eot])
        n_win = len(ids) // (seq_len + 1)
        n_held = max(1, int(round(heldout_frac * n_win)))
        if n_win - n_held < 1:
            raise BadInput(flag, f"{root / name}", f"at least {2 * (seq_len + 1)} tokens per domain "
                           f"(got {len(ids)} with --seq-len {seq_len})")
        w = torch.tensor(ids[: n_win * (seq_len + 1)], dtype=torch.int32).view(n_win, seq_len + 1)  # (N, T+1)
        train.append(w[: n_win - n_held])
        held.append(w[n_win - n_held:])
    names = tuple(files)
    if path is not None:
        atomic_write_json(path / "meta.json", {**settings, "domains": list(names),
                                               "train_windows": [int(w.shape[0]) for w in train],
                                               "heldout_windows": [int(w.shape[0]) for w in held]})
    return Corpus(names=names, train=train, heldout=held, floors=torch.full((len(names),), float("nan"), dtype=torch.float64),
                  vocab=vocab, seq_len=seq_len, key=name, config=settings, tokenizer=tok)
