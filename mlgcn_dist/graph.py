"""The label graph of ML-GCN: co-occurrence statistics, the correlation matrix, its normalisation, label embeddings.

The statistics file is the ML-GCN pickle ``{'nums': int64 [C], 'adj': int64 [C, C]}``: ``nums[i]`` images carry
label ``i`` and ``adj[i, j]`` images carry both ``i`` and ``j`` (zero diagonal). Rows and columns follow the model's
label order (COCO: names sorted, as ML-GCN; VOC: the standard 20).

Pickles are read with an unpickler that only admits numpy arrays, so a statistics or word-vector file named in a
config cannot run code when it is loaded.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import pickle
import zlib
from collections import Counter
from collections.abc import Container, Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from mlgcn_dist.config import ConfigError, GraphConfig
from mlgcn_dist.errors import one_line
from mlgcn_dist.files import replaced_atomically, write_text_atomic

# The globals a pickle of plain numpy arrays refers to, under numpy 1.x (numpy.core) and 2.x (numpy._core), for
# pickle protocols 2 to 5. Anything else in a statistics or embedding pickle is refused.
_NUMPY_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def _load_numpy_pickle(path: str | Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pickle file not found: {path}")
    with path.open("rb") as f:  # a file it cannot read is an OSError naming it
        try:
            return _NumpyOnlyUnpickler(f).load()
        except Exception as err:  # bytes that are no pickle raise anything: a length read as 2**62 is a MemoryError
            raise ValueError(f"{path}: not a pickle of numpy arrays ({one_line(err)})") from err


def label_stats(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label counts and pairwise co-occurrence counts of ``targets`` [N, C] (> 0 = present; 0 and -1 are not).

    Returns ``(nums int64 [C], adj int64 [C, C])`` in the ML-GCN pickle format (zero diagonal).
    """
    targets = np.asarray(targets)
    if targets.ndim != 2:
        raise ValueError(f"label_stats expects targets of shape [N, C], got {targets.shape}")
    # float64 so the product runs in BLAS; counts stay exact far beyond any dataset size (2**53).
    present = (targets > 0).astype(np.float64)
    nums = present.sum(axis=0).round().astype(np.int64)
    adj = (present.T @ present).round().astype(np.int64)
    np.fill_diagonal(adj, 0)
    return nums, adj


def _check_stats(nums: np.ndarray, adj: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    nums, adj = np.asarray(nums), np.asarray(adj)
    if nums.ndim != 1 or adj.shape != (nums.shape[0], nums.shape[0]):
        raise ValueError(
            f"{source}: expected 'nums' of shape [C] and 'adj' of shape [C, C], got {nums.shape} and {adj.shape}"
        )
    return nums.astype(np.int64), adj.astype(np.int64)


def read_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an ML-GCN statistics pickle ``{'nums', 'adj'}`` (e.g. ML-GCN's data/coco/coco_adj.pkl)."""
    stats = _load_numpy_pickle(path)
    if not isinstance(stats, dict) or not {"nums", "adj"} <= stats.keys():
        found = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        raise ValueError(f"{path}: expected a dict with keys 'nums' and 'adj', found {found}")
    return _check_stats(stats["nums"], stats["adj"], str(path))


def write_stats(path: str | Path, nums: np.ndarray, adj: np.ndarray) -> None:
    """Write the ML-GCN statistics pickle (protocol 3, as the original files)."""
    nums, adj = _check_stats(nums, adj, str(path))
    with replaced_atomically(Path(path), "wb") as f:
        pickle.dump({"nums": nums, "adj": adj}, f, protocol=3)


def write_stats_json(path: str | Path, nums: np.ndarray, adj: np.ndarray, label_names: list[str]) -> None:
    """A human-readable twin of the statistics pickle, with the label names in row order."""
    nums, adj = _check_stats(nums, adj, str(path))
    if len(label_names) != nums.shape[0]:
        raise ValueError(f"{path}: {len(label_names)} label names for statistics of {nums.shape[0]} labels")
    payload = {"label_names": list(label_names), "nums": nums.tolist(), "adj": adj.tolist()}
    write_text_atomic(Path(path), json.dumps(payload, indent=1))


def gen_A(nums: np.ndarray, adj: np.ndarray, t: float, p: float, variant: str = "original") -> np.ndarray:
    """The correlation matrix A [C, C] (float64) of ML-GCN from co-occurrence statistics.

    Row i holds the conditional probabilities P(j | i) = adj[i, j] / nums[i], binarised at ``t``.
    ``variant="original"`` reproduces ML-GCN's util.gen_A (which hard-codes p = 0.25): every column is scaled to sum
    to ``p`` (plus 1e-6 in the denominator, kept) and the identity is added. ``variant="paper"`` follows the paper's
    eq. 8 instead: in each row the neighbours share ``p`` and the node itself gets ``1 - p`` (a node without
    neighbours keeps only ``1 - p`` on its diagonal, hence ``p < 1``).
    A label that never occurs (nums == 0) would give 0/0 = NaN in the original; here its row has no edges.
    """
    nums, adj = _check_stats(nums, adj, "gen_A")
    num_classes = nums.shape[0]
    conditional = np.divide(
        adj, nums[:, None], out=np.zeros((num_classes, num_classes)), where=nums[:, None] > 0
    )
    edges = (conditional >= t).astype(np.float64)
    edges[nums == 0] = 0.0
    if variant == "original":
        return edges * p / (edges.sum(axis=0, keepdims=True) + 1e-6) + np.identity(num_classes)
    if variant == "paper":
        if not 0.0 <= p < 1.0:
            raise ValueError(f"gen_A: variant 'paper' needs 0 <= p < 1 (the diagonal weight is 1 - p), got p={p}")
        np.fill_diagonal(edges, 0.0)
        degree = edges.sum(axis=1, keepdims=True)
        neighbours = np.divide(edges * p, degree, out=np.zeros_like(edges), where=degree > 0)
        return neighbours + (1.0 - p) * np.identity(num_classes)
    raise ValueError(f"gen_A: unknown variant '{variant}', expected 'original' or 'paper'")


def gen_adj(A: torch.Tensor) -> torch.Tensor:
    """ML-GCN's normalisation: (A D)^T D with D = diag(rowsum(A) ** -0.5), i.e. D A^T D, in the original's order."""
    D = torch.diag(torch.pow(A.sum(1).float(), -0.5))
    return torch.matmul(torch.matmul(A, D).t(), D)


# GloVe files are also passed around compressed (fastText's .vec.gz; GloVe itself ships glove.6B.zip). The first
# bytes tell, whatever the file is named: read as text, either gives no label word at all.
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"

# A label word the file lacks may be spelled by words it has ("diningtable"); parts of one letter are not admitted,
# since GloVe has every letter as a word and would spell nearly anything.
_MIN_PART_LETTERS = 2


def _open_word_vector_text(path: Path) -> TextIO:
    with path.open("rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head.startswith(_ZIP_MAGIC):
        raise ValueError(f"{path}: a zip archive, not a word-vector text file: unzip it and name one of its .txt files")
    if head.startswith(_GZIP_MAGIC):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def _spelling_parts(word: str) -> set[str]:
    """``word`` and every run of its letters that could be one word of a split of it."""
    n = len(word)
    return {word} | {word[i:j] for i in range(n) for j in range(i + _MIN_PART_LETTERS, n + 1)}


def _read_word_vectors(path: Path, words: set[str]) -> dict[str, tuple[int, np.ndarray]]:
    """Line number and vector of each of ``words`` and of the words that could spell them, from a GloVe text file
    (plain or gzip). Only those are kept, and reading stops once every one of ``words`` itself is found: GloVe
    files are GBs. A word of ``words`` that the file lacks makes it read to the end, for its spelling parts."""
    wanted = set().union(*map(_spelling_parts, words))
    found: dict[str, tuple[int, np.ndarray]] = {}
    exact_left = len(words)
    with _open_word_vector_text(path) as f:
        try:
            for line_number, line in enumerate(f, start=1):
                word, _, values = line.rstrip("\n").partition(" ")
                # A word repeated in the file keeps its first vector.
                if word not in wanted or word in found:
                    continue
                try:
                    vector = np.array(values.split(), dtype=np.float32)
                except ValueError:
                    continue  # glove.840B has a few tokens that contain spaces: they are not label words
                found[word] = (line_number, vector)
                exact_left -= word in words
                if not exact_left:
                    break
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # only the gzip reader raises these
            raise ValueError(f"{path}: a damaged gzip file ({one_line(err)})") from err
    return found


def _split_into_known_words(word: str, known: Container[str]) -> list[str] | None:
    """``word`` as two or more ``known`` words of two letters or more that spell it, or None. Of several splits
    the one with the fewest words wins, then the one with the longest first word, then longest second, ...
    (tvmonitor: tv + monitor, not t + v + monitor; carpets: carp + ets over car + pets)."""
    n = len(word)
    # best[i]: the winning split of word[i:] into known words (no split needed at the end, none found: None).
    best: list[list[str] | None] = [None] * n + [[]]
    for i in range(n - 1, -1, -1):
        for j in range(n, i + _MIN_PART_LETTERS - 1, -1):  # longest first word first: it wins a tie
            rest = best[j]
            if rest is None or word[i:j] not in known or (i == 0 and j == n):
                continue
            if best[i] is None or len(rest) + 1 < len(best[i]):
                best[i] = [word[i:j], *rest]
    return best[0]


def _words_spelling(path: Path, label_words: set[str], found: Container[str]) -> dict[str, list[str]]:
    """The file's words that stand for each label word: itself when the file has it, else a split of it."""
    spelling = {w: [w] if w in found else _split_into_known_words(w, found) for w in sorted(label_words)}
    missing = [w for w, parts in spelling.items() if parts is None]
    if missing:
        raise ValueError(
            f"{path}: no vector for the word(s) {', '.join(missing)} (needed by the label names), nor for two or "
            "more words that spell them joined"
        )
    return spelling


def _check_one_length(path: Path, vectors: dict[str, tuple[int, np.ndarray]]) -> None:
    """All ``vectors`` have the length most of them have; the others are named with their line."""
    lengths = Counter(vector.shape[0] for _, vector in vectors.values())
    if len(lengths) == 1:
        return
    common = lengths.most_common(1)[0][0]
    odd = sorted((line, word, v.shape[0]) for word, (line, v) in vectors.items() if v.shape[0] != common)
    listed = ", ".join(f"'{word}' (line {line}) has {length} value(s)" for line, word, length in odd)
    raise ValueError(f"{path}: word vectors of different lengths: {listed}, the others {common}")


def _glove_embeddings(path: Path, label_names: list[str]) -> np.ndarray:
    """A label's vector is the mean of its words' vectors ("baseball bat" = mean of "baseball" and "bat"). A label
    word the file lacks counts as the words that spell it, if the file has them (VOC's "diningtable" = "dining" and
    "table"; see :func:`_split_into_known_words`)."""
    label_words = [name.split() for name in label_names]
    wanted = {w for words in label_words for w in words}
    found = _read_word_vectors(path, wanted)
    spelling = _words_spelling(path, wanted, found)
    used = {part for parts in spelling.values() for part in parts}
    _check_one_length(path, {word: found[word] for word in used})
    rows = [[found[part][1] for w in words for part in spelling[w]] for words in label_words]
    return np.stack([np.mean(row, axis=0) for row in rows]).astype(np.float32)


def _check_finite(path: Path, vectors: np.ndarray, label_names: list[str]) -> None:
    # The GCN head would refuse them too, but as a traceback that names neither the file nor the label.
    bad = [f"'{name}' (row {i})" for i, name in enumerate(label_names) if not np.isfinite(vectors[i]).all()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{path}: the vector of label(s) {', '.join(bad[:5])}{more} holds NaN or infinite values")


def load_embeddings(spec: str, label_names: list[str]) -> np.ndarray:
    """Label embeddings [C, d] float32: "onehot", an ML-GCN word-vector pickle (.pkl/.pickle), or a GloVe text file
    (plain or gzip-compressed)."""
    num_classes = len(label_names)
    if spec == "onehot":
        return np.identity(num_classes, dtype=np.float32)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path} (graph.embeddings; use 'onehot' for none)")
    if path.suffix in (".pkl", ".pickle"):
        vectors = _load_numpy_pickle(path)
        if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.shape[0] != num_classes:
            shape = vectors.shape if isinstance(vectors, np.ndarray) else type(vectors).__name__
            raise ValueError(f"{path}: expected an array of shape ({num_classes}, d), one row per label; got {shape}")
        vectors = vectors.astype(np.float32)
    else:
        vectors = _glove_embeddings(path, label_names)
    _check_finite(path, vectors, label_names)  # after the cast: a float64 beyond float32's range is inf by now
    return vectors


def build_graph_inputs(
    graph_cfg: GraphConfig, label_names: list[str], nums: np.ndarray | None, adj: np.ndarray | None
) -> tuple[torch.Tensor, np.ndarray]:
    """The GCN's inputs: normalised adjacency gen_adj(gen_A(...)) float32 [C, C] and the label embeddings [C, d].

    The statistics come from ``graph_cfg.stats`` when it is set (``nums``/``adj`` are then ignored), otherwise
    from ``nums``/``adj`` (computed on the training split with :func:`label_stats`).
    """
    num_classes = len(label_names)
    if graph_cfg.stats:
        with _named_by_key("graph.stats"):
            nums, adj = read_stats(graph_cfg.stats)
        source = f"{graph_cfg.stats} (graph.stats)"
    elif nums is None or adj is None:
        raise ValueError("build_graph_inputs: graph.stats is empty and no label statistics were given")
    else:
        source = "label statistics"
    if np.shape(nums) != (num_classes,):
        raise ConfigError(f"{source}: statistics for {np.shape(nums)} labels, the label space has {num_classes}")
    with _named_by_key("graph.p"):  # the paper variant's own range
        A = gen_A(nums, adj, graph_cfg.t, graph_cfg.p, graph_cfg.variant)
    # float32 before normalising, as ML-GCN keeps A as a float32 parameter and normalises it in the forward pass.
    adjacency = gen_adj(torch.from_numpy(A).float())
    with _named_by_key("graph.embeddings"):
        embeddings = load_embeddings(graph_cfg.embeddings, label_names)
    return adjacency, embeddings


@contextlib.contextmanager
def _named_by_key(key: str) -> Iterator[None]:
    """A file or value that a config key names and that cannot be used: a ConfigError naming the key (training
    then stops with one line and exit status 2, not a traceback)."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{key}: {err}") from err
