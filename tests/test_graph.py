"""The label graph: statistics, gen_A / gen_adj against ML-GCN's reference pickles, embeddings."""

from __future__ import annotations

import gzip
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reference_dir

from mlgcn_dist.config import ConfigError, GraphConfig
from mlgcn_dist.graph import (
    build_graph_inputs,
    gen_A,
    gen_adj,
    label_stats,
    load_embeddings,
    read_stats,
    write_stats,
    write_stats_json,
)

REFERENCE = reference_dir()
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"ML-GCN reference data absent ({REFERENCE})")

# ML-GCN's COCO label order: the 80 category names sorted as strings (reference README.txt).
COCO_NAMES = [
    "airplane", "apple", "backpack", "banana", "baseball bat", "baseball glove", "bear", "bed", "bench",
    "bicycle", "bird", "boat", "book", "bottle", "bowl", "broccoli", "bus", "cake", "car", "carrot", "cat",
    "cell phone", "chair", "clock", "couch", "cow", "cup", "dining table", "dog", "donut", "elephant",
    "fire hydrant", "fork", "frisbee", "giraffe", "hair drier", "handbag", "horse", "hot dog", "keyboard", "kite",
    "knife", "laptop", "microwave", "motorcycle", "mouse", "orange", "oven", "parking meter", "person", "pizza",
    "potted plant", "refrigerator", "remote", "sandwich", "scissors", "sheep", "sink", "skateboard", "skis",
    "snowboard", "spoon", "sports ball", "stop sign", "suitcase", "surfboard", "teddy bear", "tennis racket", "tie",
    "toaster", "toilet", "toothbrush", "traffic light", "train", "truck", "tv", "umbrella", "vase", "wine glass",
    "zebra",
]  # fmt: skip
VOC_NAMES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def straightforward_gen_A(nums: np.ndarray, adj: np.ndarray, t: float, p: float) -> np.ndarray:
    """ML-GCN's gen_A written element by element, as an independent reference."""
    c = len(nums)
    edge = [[1.0 if adj[i, j] / nums[i] >= t else 0.0 for j in range(c)] for i in range(c)]
    column_sums = [sum(edge[i][j] for i in range(c)) for j in range(c)]
    return np.array(
        [[edge[i][j] * p / (column_sums[j] + 1e-6) + (i == j) for j in range(c)] for i in range(c)]
    )


def straightforward_gen_adj(A: np.ndarray) -> np.ndarray:
    """out[i, j] = A[j, i] / sqrt(rowsum_i rowsum_j), i.e. D A^T D, element by element in float64."""
    r = A.sum(axis=1)
    c = len(r)
    return np.array([[A[j, i] / np.sqrt(r[i] * r[j]) for j in range(c)] for i in range(c)])


@pytest.fixture(params=["coco", "voc"])
def reference_stats(request) -> tuple[np.ndarray, np.ndarray]:
    if not REFERENCE.is_dir():
        pytest.skip(f"ML-GCN reference data absent ({REFERENCE})")
    return read_stats(REFERENCE / f"{request.param}_adj.pkl")


def test_label_stats_counts_images_and_pairs_of_a_hand_made_matrix():
    targets = np.array([[1, 0, 1], [1, 1, -1], [0, 0, 0], [1, 1, 1]], dtype=np.int8)
    nums, adj = label_stats(targets)
    assert nums.dtype == np.int64 and adj.dtype == np.int64
    assert nums.tolist() == [3, 2, 2]  # the difficult (-1) entry is not counted
    assert adj.tolist() == [[0, 2, 2], [2, 0, 1], [2, 1, 0]]
    with pytest.raises(ValueError, match=r"shape \[N, C\], got \(3,\)"):
        label_stats(np.array([1, 0, 1]))


def test_stats_pickle_round_trip_keeps_values_and_int64(tmp_path):
    nums, adj = label_stats(np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1]]))
    write_stats(tmp_path / "stats.pkl", nums.astype(np.int32), adj.astype(np.int32))  # written as int64
    assert (tmp_path / "stats.pkl").read_bytes()[:2] == b"\x80\x03"  # pickle protocol 3, as ML-GCN's files
    read_nums, read_adj = read_stats(tmp_path / "stats.pkl")
    assert read_nums.dtype == np.int64 and read_adj.dtype == np.int64
    np.testing.assert_array_equal(read_nums, nums)
    np.testing.assert_array_equal(read_adj, adj)


def test_stats_json_twin_lists_names_and_counts(tmp_path):
    nums, adj = label_stats(np.array([[1, 1], [0, 1]]))
    write_stats_json(tmp_path / "stats.json", nums, adj, ["cat", "dog"])
    payload = json.loads((tmp_path / "stats.json").read_text())
    assert payload == {"label_names": ["cat", "dog"], "nums": [1, 2], "adj": [[0, 1], [1, 0]]}
    with pytest.raises(ValueError, match=r"stats\.json: 3 label names for statistics of 2 labels"):
        write_stats_json(tmp_path / "stats.json", nums, adj, ["cat", "dog", "cow"])


@pytest.mark.parametrize("write", [
    lambda path, nums, adj: write_stats(path, nums, adj),
    lambda path, nums, adj: write_stats_json(path, nums, adj, ["a", "b"]),
], ids=["pickle", "json"])
def test_statistics_files_are_replaced_whole_so_a_reader_of_the_old_file_never_sees_a_mix(tmp_path, write):
    path = tmp_path / "stats"
    write(path, *label_stats(np.array([[1, 1], [0, 1]])))
    old = path.read_bytes()
    with path.open("rb") as reader:
        write(path, *label_stats(np.array([[1, 0], [1, 1], [1, 1]])))
        assert reader.read() == old
    assert path.read_bytes() != old


def test_read_stats_names_the_file_when_a_key_is_missing(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({"nums": np.zeros(3, dtype=np.int64)}))
    with pytest.raises(ValueError, match=r"bad\.pkl.*'nums' and 'adj'"):
        read_stats(path)


def test_read_stats_names_the_file_when_shapes_disagree(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({"nums": np.zeros(3, dtype=np.int64), "adj": np.zeros((2, 2), dtype=np.int64)}))
    with pytest.raises(ValueError, match=r"bad\.pkl.*\[C, C\]"):
        read_stats(path)


def test_read_stats_refuses_a_pickle_that_holds_more_than_numpy_arrays(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"nums": Path("x"), "adj": np.zeros((1, 1))}))
    with pytest.raises(ValueError, match=r"evil\.pkl.*refusing to load pathlib"):
        read_stats(path)


def test_read_stats_names_any_bytes_that_are_no_pickle_as_such_whatever_the_unpickler_raises(tmp_path):
    """Random bytes make the unpickler raise anything: a length read as 2**62 is a MemoryError (seen in CI), an
    opcode's argument a KeyError or an OverflowError. Every one must be the error naming the file."""
    path = tmp_path / "junk.bin"
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(300):
        path.write_bytes(rng.integers(0, 256, size=int(rng.integers(1, 300)), dtype=np.uint8).tobytes())
        try:
            read_stats(path)
        except ValueError as err:
            assert str(err).startswith(f"{path}: ")
            if err.__cause__ is not None:
                kinds.add(type(err.__cause__).__name__)
    assert len(kinds) >= 3  # the fuzzing reached more than the unpickler's own error
    memory = tmp_path / "huge.bin"
    memory.write_bytes(b"\x8e" + (2**62).to_bytes(8, "little"))  # BINBYTES8 of 2**62 bytes: a MemoryError
    with pytest.raises(ValueError, match=r"huge\.bin: not a pickle of numpy arrays"):
        read_stats(memory)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_read_stats_accepts_a_numpy_pickle_of_any_protocol_from_two_to_five(tmp_path, protocol):
    nums, adj = label_stats(np.array([[1, 1, 0], [0, 1, 1]]))
    path = tmp_path / "stats.pkl"
    path.write_bytes(pickle.dumps({"nums": nums, "adj": adj}, protocol=protocol))
    read_nums, read_adj = read_stats(path)
    np.testing.assert_array_equal(read_nums, nums)
    np.testing.assert_array_equal(read_adj, adj)


def test_read_stats_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pkl"):
        read_stats(tmp_path / "nothere.pkl")


@needs_reference
def test_reference_coco_pickle_reads_with_the_documented_counts():
    nums, adj = read_stats(REFERENCE / "coco_adj.pkl")
    assert nums.shape == (80,) and adj.shape == (80, 80)
    assert nums.sum() == 241035 and adj.sum() == 741362
    assert COCO_NAMES[int(nums.argmax())] == "person" and nums[49] == 45174
    np.testing.assert_array_equal(adj, adj.T)
    assert not np.diag(adj).any()


def test_gen_A_matches_an_element_by_element_formula_on_the_reference_pickles(reference_stats):
    nums, adj = reference_stats
    np.testing.assert_allclose(gen_A(nums, adj, 0.4, 0.25), straightforward_gen_A(nums, adj, 0.4, 0.25), atol=1e-12)


def test_gen_adj_matches_d_at_d_on_the_reference_pickles(reference_stats):
    A = gen_A(*reference_stats, 0.4, 0.25)
    normalised = gen_adj(torch.from_numpy(A).float())
    assert normalised.dtype == torch.float32
    np.testing.assert_allclose(normalised.numpy(), straightforward_gen_adj(A), rtol=1e-5, atol=1e-7)


def test_gen_A_original_gives_each_column_with_edges_weight_p_off_the_diagonal(reference_stats):
    A = gen_A(*reference_stats, 0.4, 0.3)
    np.testing.assert_array_equal(np.diag(A), 1.0)  # no label is its own neighbour: the diagonal is the identity
    off_diagonal = A - np.identity(A.shape[0])
    column_sums = off_diagonal.sum(axis=0)
    has_edges = (off_diagonal > 0).any(axis=0)
    assert has_edges.any()
    np.testing.assert_allclose(column_sums[has_edges], 0.3, rtol=1e-5)
    assert not column_sums[~has_edges].any()


@needs_reference
def test_gen_A_person_row_of_coco_has_no_neighbour_and_its_column_has_55():
    nums, adj = read_stats(REFERENCE / "coco_adj.pkl")
    A = gen_A(nums, adj, 0.4, 0.25)
    person = COCO_NAMES.index("person")
    # No label appears in 40% of the person images (the most frequent, car, in 13.4%) ...
    np.testing.assert_array_equal(A[person], np.eye(80)[person])
    # ... but 55 labels appear with a person in at least 40% of their own images; they share p = 0.25.
    column = np.delete(A[:, person], person)
    assert (column > 0).sum() == 55
    np.testing.assert_allclose(column[column > 0], 0.25 / (55 + 1e-6))


def test_gen_A_counts_a_conditional_probability_equal_to_t_as_an_edge():
    A = gen_A(np.array([10, 5]), np.array([[0, 4], [4, 0]]), t=0.4, p=0.25)  # P(1|0) = 0.4, P(0|1) = 0.8
    np.testing.assert_allclose(A, [[1.0, 0.25 / (1 + 1e-6)], [0.25 / (1 + 1e-6), 1.0]])


def test_gen_A_gives_a_label_that_never_occurs_no_edges_instead_of_nan():
    nums, adj = np.array([0, 4, 4]), np.array([[0, 0, 0], [0, 0, 4], [0, 4, 0]])
    for variant, t in (("original", 0.4), ("paper", 0.4), ("original", 0.0)):  # t = 0 (allowed) makes 0 >= t
        A = gen_A(nums, adj, t, 0.25, variant)
        assert np.isfinite(A).all()
        assert A[0, 1] == A[0, 2] == 0.0
        assert torch.isfinite(gen_adj(torch.from_numpy(A).float())).all()


def test_gen_A_paper_variant_gives_neighbours_p_and_the_node_one_minus_p(reference_stats):
    A = gen_A(*reference_stats, 0.4, 0.2, variant="paper")
    np.testing.assert_allclose(np.diag(A), 0.8)
    off_diagonal = A - np.diag(np.diag(A))
    has_neighbours = (off_diagonal > 0).any(axis=1)
    np.testing.assert_allclose(A[has_neighbours].sum(axis=1), 1.0)
    np.testing.assert_allclose(A[~has_neighbours].sum(axis=1), 0.8)


def test_gen_A_rejects_an_unknown_variant_and_a_paper_p_of_one():
    nums, adj = np.array([2, 2]), np.array([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="unknown variant 'eq8'"):
        gen_A(nums, adj, 0.4, 0.25, variant="eq8")
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match="0 <= p < 1"):
            gen_A(nums, adj, 0.4, p, variant="paper")


def test_gen_adj_of_a_symmetric_matrix_is_symmetric_and_transposes_a_non_symmetric_one():
    symmetric = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.0]])
    out = gen_adj(symmetric)
    torch.testing.assert_close(out, out.t())
    A = torch.tensor([[1.0, 3.0], [0.0, 1.0]])  # row sums 4 and 1: D = diag(1/2, 1)
    torch.testing.assert_close(gen_adj(A), torch.tensor([[0.25, 0.0], [1.5, 1.0]]))


def write_glove(path: Path, rows: dict[str, list[float]]) -> Path:
    path.write_text("".join(f"{word} {' '.join(map(str, vec))}\n" for word, vec in rows.items()))
    return path


def test_glove_text_gives_multi_word_labels_the_mean_of_their_words(tmp_path):
    glove = write_glove(tmp_path / "glove.txt", {"the": [9, 9], "baseball": [1, 2], "bat": [3, 4], "cat": [5, 6]})
    vectors = load_embeddings(str(glove), ["baseball bat", "cat"])
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, [[2.0, 3.0], [5.0, 6.0]])


def test_glove_text_error_lists_every_missing_word(tmp_path):
    glove = write_glove(tmp_path / "glove.txt", {"hair": [1, 2], "cat": [5, 6], "phone": [0, 1]})
    with pytest.raises(ValueError, match=r"glove\.txt.*cell, drier"):
        load_embeddings(str(glove), ["hair drier", "cat", "cell phone"])


def test_a_glove_file_of_split_words_gives_joined_voc_names_the_mean_of_their_words(tmp_path):
    """VOC names labels diningtable, pottedplant, tvmonitor; GloVe has dining, table, potted, plant, tv, monitor."""
    rows = {"dining": [1, 2], "table": [3, 4], "potted": [0, 0], "plant": [2, 2], "tv": [4, 0], "monitor": [0, 4]}
    glove = write_glove(tmp_path / "glove.txt", {**rows, "cat": [5, 6]})
    vectors = load_embeddings(str(glove), ["diningtable", "pottedplant", "tvmonitor", "cat"])
    np.testing.assert_allclose(vectors, [[2.0, 3.0], [1.0, 1.0], [2.0, 2.0], [5.0, 6.0]])


def test_a_joined_label_word_that_the_file_has_keeps_its_own_vector_over_its_split(tmp_path):
    glove = write_glove(tmp_path / "glove.txt", {"dining": [1, 2], "table": [3, 4], "diningtable": [7, 7]})
    np.testing.assert_allclose(load_embeddings(str(glove), ["diningtable"]), [[7.0, 7.0]])


def test_a_joined_word_with_several_splits_takes_the_fewest_words_then_the_longest_first_word(tmp_path):
    rows = {"pot": [9, 9], "ted": [9, 9], "potted": [1, 1], "plant": [3, 3],  # potted+plant beats pot+ted+plant
            "car": [9, 9], "pets": [9, 9], "carp": [2, 0], "ets": [0, 2]}  # carp+ets beats car+pets
    glove = write_glove(tmp_path / "glove.txt", rows)
    np.testing.assert_allclose(load_embeddings(str(glove), ["pottedplant", "carpets"]), [[2.0, 2.0], [1.0, 1.0]])


def test_a_word_with_neither_a_vector_nor_a_split_into_words_of_two_letters_or_more_is_named_missing(tmp_path):
    """Single letters are GloVe words too: splitting into them would give almost any word a meaningless vector."""
    glove = write_glove(tmp_path / "glove.txt", {"dining": [1, 2], "x": [0, 1], "ray": [1, 0], "cat": [5, 6]})
    with pytest.raises(ValueError, match=r"glove\.txt: no vector for the word\(s\) diningtable, xray "):
        load_embeddings(str(glove), ["diningtable", "cat", "xray"])


def test_a_word_vector_of_another_length_is_named_with_its_line(tmp_path):
    glove = write_glove(tmp_path / "glove.txt", {"the": [0], "cat": [1, 2], "car": [3], "dog": [5, 6]})
    only_car = r"glove\.txt: word vectors of different lengths: 'car' \(line 3\) has 1 value\(s\), "
    with pytest.raises(ValueError, match=only_car + "the others 2$"):
        load_embeddings(str(glove), ["cat", "car", "dog"])


def test_a_word_the_labels_do_not_use_may_have_a_vector_of_another_length(tmp_path):
    # "at" could spell part of "cat", but "cat" has its own vector: "at" is not used.
    glove = write_glove(tmp_path / "glove.txt", {"at": [9], "cat": [1, 2], "dog": [5, 6]})
    np.testing.assert_array_equal(load_embeddings(str(glove), ["cat", "dog"]), [[1, 2], [5, 6]])


def test_a_word_repeated_in_the_file_keeps_its_first_vector(tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("cat 1 2\ncat 3 4\ndog 5 6\n")
    np.testing.assert_array_equal(load_embeddings(str(glove), ["cat", "dog"]), [[1, 2], [5, 6]])


def test_a_token_with_spaces_that_begins_with_a_label_word_is_skipped(tmp_path):
    """glove.840B holds a few tokens with spaces in them: "cat" below is such a token's first word."""
    glove = tmp_path / "glove.txt"
    glove.write_text("cat in the hat 1 2\ncat 3 4\n")
    np.testing.assert_array_equal(load_embeddings(str(glove), ["cat"]), [[3, 4]])


def test_bytes_that_are_not_utf8_in_another_word_do_not_stop_the_reading(tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_bytes(b"caf\xe9 9 9\ncat 1 2\n")
    np.testing.assert_array_equal(load_embeddings(str(glove), ["cat"]), [[1, 2]])


def test_reading_stops_once_every_label_word_is_found(tmp_path):
    """GloVe files are GBs: a gzip file damaged only after the label words loads, as it is not read there."""
    text = write_glove(tmp_path / "glove.txt", {"cat": [5, 6]} | {f"w{i}": [i, i] for i in range(2000)})
    packed = tmp_path / "glove.txt.gz"
    packed.write_bytes(gzip.compress(text.read_bytes())[:-100])
    np.testing.assert_array_equal(load_embeddings(str(packed), ["cat"]), [[5, 6]])


def test_a_gzip_compressed_glove_file_is_read_as_the_text_it_holds(tmp_path):
    text = write_glove(tmp_path / "glove.txt", {"baseball": [1, 2], "bat": [3, 4], "cat": [5, 6]})
    packed = tmp_path / "glove.txt.gz"
    packed.write_bytes(gzip.compress(text.read_bytes()))
    np.testing.assert_array_equal(load_embeddings(str(packed), ["baseball bat", "cat"]),
                                  load_embeddings(str(text), ["baseball bat", "cat"]))


def test_a_gzip_glove_file_cut_short_is_named_as_damaged_not_as_missing_words(tmp_path):
    text = write_glove(tmp_path / "glove.txt", {f"w{i}": [i, i] for i in range(2000)} | {"cat": [5, 6]})
    packed = tmp_path / "glove.txt.gz"
    packed.write_bytes(gzip.compress(text.read_bytes())[:-100])
    with pytest.raises(ValueError, match=r"glove\.txt\.gz: a damaged gzip file"):
        load_embeddings(str(packed), ["cat"])


def test_a_zipped_glove_file_whatever_its_name_is_refused_with_advice_to_unzip_it(tmp_path):
    text = write_glove(tmp_path / "glove.6B.50d.txt", {"cat": [5, 6]})
    archive = tmp_path / "glove.6B.txt"  # named like text: the first bytes tell
    with zipfile.ZipFile(archive, "w") as z:
        z.write(text, text.name)
    with pytest.raises(ValueError, match=r"glove\.6B\.txt: a zip archive.*unzip"):
        load_embeddings(str(archive), ["cat"])


def test_non_finite_embeddings_name_the_file_and_the_labels_whose_vector_is_not_finite(tmp_path):
    pickled = tmp_path / "vectors.pkl"
    pickled.write_bytes(pickle.dumps(np.array([[0, 1], [np.nan, 1], [0, 1], [np.inf, 0]], dtype=np.float32)))
    with pytest.raises(ValueError, match=r"vectors\.pkl: .*'dog' \(row 1\), 'cow' \(row 3\).*NaN or infinite"):
        load_embeddings(str(pickled), ["cat", "dog", "car", "cow"])
    glove = write_glove(tmp_path / "glove.txt", {"cat": [1, 2], "hot": ["nan", 0], "dog": [1, 1]})
    with pytest.raises(ValueError, match=r"glove\.txt: .*'hot dog' \(row 1\).*NaN or infinite"):
        load_embeddings(str(glove), ["cat", "hot dog"])


def test_non_finite_embeddings_stop_graph_building_with_a_config_error_naming_graph_embeddings(tmp_path):
    pickled = tmp_path / "vectors.pkl"
    pickled.write_bytes(pickle.dumps(np.array([[0, 1], [1, np.nan]], dtype=np.float32)))
    nums, adj = label_stats(np.array([[1, 1], [0, 1]]))
    with pytest.raises(ConfigError, match=r"^graph\.embeddings: .*vectors\.pkl: .*'b' \(row 1\)"):
        build_graph_inputs(GraphConfig(embeddings=str(pickled)), ["a", "b"], nums, adj)


def test_load_embeddings_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent_glove.txt"):
        load_embeddings(str(tmp_path / "absent_glove.txt"), ["cat"])


def test_onehot_embeddings_are_the_identity():
    onehot = load_embeddings("onehot", ["a", "b", "c"])
    assert onehot.dtype == np.float32
    np.testing.assert_array_equal(onehot, np.eye(3))


@pytest.mark.parametrize("shape", [(3, 4), (2,)])
def test_embedding_pickle_of_another_shape_names_file_and_expected_shape(tmp_path, shape):
    path = tmp_path / "vectors.pkl"
    path.write_bytes(pickle.dumps(np.zeros(shape, dtype=np.float32)))
    with pytest.raises(ValueError, match=rf"vectors\.pkl.*\(2, d\).*{re.escape(str(shape))}"):
        load_embeddings(str(path), ["cat", "dog"])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_float64_embedding_pickle_is_cast_to_float32_and_a_value_beyond_its_range_is_refused(tmp_path):
    path = tmp_path / "vectors.pkl"
    path.write_bytes(pickle.dumps(np.array([[0.5, 1.0], [2.0, 3.0]])))
    vectors = load_embeddings(str(path), ["cat", "dog"])
    assert vectors.dtype == np.float32 and vectors.tolist() == [[0.5, 1.0], [2.0, 3.0]]
    path.write_bytes(pickle.dumps(np.array([[0.5, 1.0], [1e300, 3.0]])))  # finite in float64, inf in float32
    with pytest.raises(ValueError, match=r"'dog' \(row 1\) holds NaN or infinite"):
        load_embeddings(str(path), ["cat", "dog"])


@needs_reference
def test_reference_coco_word_vectors_load_for_the_80_names_in_reference_order():
    coco = load_embeddings(str(REFERENCE / "coco_glove_word2vec.pkl"), COCO_NAMES)
    voc = load_embeddings(str(REFERENCE / "voc_glove_word2vec.pkl"), VOC_NAMES)
    assert coco.shape == (80, 300) and coco.dtype == np.float32
    for word in ("cat", "person", "dog"):  # shared words have the same GloVe row in both files
        np.testing.assert_array_equal(coco[COCO_NAMES.index(word)], voc[VOC_NAMES.index(word)])


@needs_reference
def test_build_graph_inputs_reads_stats_and_word_vectors_named_in_the_config():
    cfg = GraphConfig(stats=str(REFERENCE / "coco_adj.pkl"), embeddings=str(REFERENCE / "coco_glove_word2vec.pkl"))
    adjacency, embeddings = build_graph_inputs(cfg, COCO_NAMES, None, None)
    nums, adj = read_stats(REFERENCE / "coco_adj.pkl")
    assert adjacency.dtype == torch.float32 and adjacency.shape == (80, 80)
    torch.testing.assert_close(adjacency, gen_adj(torch.from_numpy(gen_A(nums, adj, 0.4, 0.25)).float()))
    assert embeddings.shape == (80, 300)


@needs_reference
def test_build_graph_inputs_rejects_stats_for_another_label_space():
    cfg = GraphConfig(stats=str(REFERENCE / "coco_adj.pkl"))
    with pytest.raises(ValueError, match=r"coco_adj\.pkl.*has 20"):
        build_graph_inputs(cfg, VOC_NAMES, None, None)


def test_build_graph_inputs_uses_given_statistics_without_a_stats_file():
    nums, adj = label_stats(np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]]))
    adjacency, embeddings = build_graph_inputs(GraphConfig(), ["a", "b", "c"], nums, adj)
    expected = gen_adj(torch.from_numpy(gen_A(nums, adj, 0.4, 0.25)).float())
    torch.testing.assert_close(adjacency, expected)
    np.testing.assert_array_equal(embeddings, np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="graph.stats is empty"):
        build_graph_inputs(GraphConfig(), ["a", "b", "c"], None, None)


def test_the_paper_variant_keeps_each_labels_self_weight_at_one_minus_p_even_when_the_stats_count_self_pairs():
    """Eq. 8 of the paper: the node gets 1 - p and its *other* neighbours share p. A statistics pickle whose
    diagonal is not zero (nothing forbids one) must not make a label its own neighbour."""
    nums = np.array([4, 4, 4, 4])
    adj = np.array([[4, 2, 0, 0], [2, 4, 2, 0], [0, 2, 4, 0], [0, 0, 0, 4]])  # label 3: only its own pair
    A = gen_A(nums, adj, t=0.4, p=0.2, variant="paper")
    np.testing.assert_array_equal(np.diag(A), 1.0 - 0.2)
    off_diagonal = A - np.diag(np.diag(A))
    np.testing.assert_allclose(off_diagonal.sum(axis=1), [0.2, 0.2, 0.2, 0.0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(off_diagonal[1], [0.1, 0.0, 0.1, 0.0], rtol=1e-12)


def test_build_graph_inputs_honours_the_threshold_t():
    nums, adj = label_stats(np.array([[1, 1], [1, 0]]))  # P(1 | 0) = 0.5, P(0 | 1) = 1
    adjacency, _ = build_graph_inputs(GraphConfig(t=0.6), ["a", "b"], nums, adj)
    torch.testing.assert_close(adjacency, gen_adj(torch.from_numpy(gen_A(nums, adj, 0.6, 0.25)).float()))
    assert adjacency[1, 0] == 0 and adjacency[0, 1] > 0  # the 0 -> 1 edge is below t


@pytest.mark.parametrize(("key", "fields"), [
    ("graph.stats", lambda tmp: {"stats": str(tmp / "missing_stats.pkl")}),
    ("graph.embeddings", lambda tmp: {"embeddings": str(tmp / "missing_glove.txt")}),
    ("graph.p", lambda tmp: {"variant": "paper", "p": 1.0}),
], ids=["stats", "embeddings", "p"])
def test_an_unusable_graph_file_or_value_stops_graph_building_with_a_config_error_naming_its_key(
        tmp_path, key, fields):
    nums, adj = label_stats(np.array([[1, 1], [0, 1]]))
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: "):
        build_graph_inputs(GraphConfig(**fields(tmp_path)), ["a", "b"], nums, adj)


def test_build_graph_inputs_honours_the_paper_variant():
    # Every label has a neighbour, so every row of the paper's A sums to one and gen_adj(A) is exactly A^T.
    nums, adj = label_stats(np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]]))
    adjacency, _ = build_graph_inputs(GraphConfig(variant="paper", p=0.2), ["a", "b", "c"], nums, adj)
    expected_A = np.array([[0.8, 0.2, 0.0], [0.1, 0.8, 0.1], [0.0, 0.2, 0.8]])
    np.testing.assert_allclose(gen_A(nums, adj, 0.4, 0.2, "paper"), expected_A, rtol=1e-12)
    torch.testing.assert_close(adjacency, torch.from_numpy(expected_A.T).float())
    torch.testing.assert_close(adjacency, gen_adj(torch.from_numpy(gen_A(nums, adj, 0.4, 0.2, "paper")).float()))


def test_build_graph_inputs_takes_graph_stats_over_the_statistics_it_is_given(tmp_path):
    """The engine always passes the training split's statistics: a graph.stats file must still win over them."""
    file_nums, file_adj = label_stats(np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]]))
    split_nums, split_adj = label_stats(np.array([[1, 0, 1], [0, 1, 1], [0, 1, 0]]))
    write_stats(tmp_path / "stats.pkl", file_nums, file_adj)
    adjacency, _ = build_graph_inputs(GraphConfig(stats=str(tmp_path / "stats.pkl")), ["a", "b", "c"],
                                      split_nums, split_adj)
    from_file = gen_adj(torch.from_numpy(gen_A(file_nums, file_adj, 0.4, 0.25)).float())
    from_split = gen_adj(torch.from_numpy(gen_A(split_nums, split_adj, 0.4, 0.25)).float())
    assert not torch.allclose(from_file, from_split)
    torch.testing.assert_close(adjacency, from_file)
