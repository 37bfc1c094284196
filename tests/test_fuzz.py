"""Fuzzing the inputs a user writes by hand: the config loader and the COCO/VOC annotation readers.

Whatever the input, the only exceptions are the documented ones, each naming what was wrong: ConfigError from the
config loader; FileNotFoundError or ValueError naming the file from the readers (never a KeyError or TypeError
from deep inside). Examples are derandomized and few, so these run in seconds and the same way on every machine.
"""

from __future__ import annotations

import json
import string
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlgcn_dist.config import CHOICES, Config, ConfigError, load_config
from mlgcn_dist.data.coco import read_coco
from mlgcn_dist.data.voc import VOC_CLASSES, read_voc

FUZZ = settings(max_examples=150, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ----------------------------------------------------------------------------------------------- config

SECTIONS = list(Config.__dataclass_fields__)
KEYS = [f"{s}.{f}" for s in SECTIONS for f in getattr(Config(), s).__dataclass_fields__]

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
# Mostly real key names (so values reach the type checks and validate()), sometimes a typo or another section.
config_keys = st.one_of(st.sampled_from(KEYS), st.text(alphabet=string.ascii_lowercase + "._", max_size=20))
junk_values = st.one_of(
    st.text(max_size=16),
    st.sampled_from(["[1,", "[", "!!python/name:os.system", "{a: 1}", "1e400", "9" * 400, ".nan", "-.inf",
                     "-1", "0", "true", "[3, 2]", "a,b", "'unclosed", "\x00"]),
    json_values.map(json.dumps),
)


def typed_values(key: str) -> st.SearchStrategy:
    """Values of the key's own type (or one of its choices), near the edges, as command-line text."""
    section, name = key.split(".")
    kind = typing.get_type_hints(type(getattr(Config(), section)))[name]
    plain = {bool: st.booleans(), int: st.integers(min_value=-1, max_value=2) | st.integers(min_value=-2, max_value=40),
             float: st.floats(min_value=-2, max_value=2) | st.sampled_from([float("nan"), float("inf"), 1e6]),
             str: st.sampled_from(CHOICES.get(key, ("", "x")))}
    if typing.get_origin(kind) is list:
        return st.lists(plain[typing.get_args(kind)[0]], max_size=3).map(json.dumps)
    return plain[kind].map(lambda v: json.dumps(v) if not isinstance(v, str) else v)


overrides = st.one_of(
    st.sampled_from(KEYS).flatmap(lambda key: typed_values(key).map(lambda value: f"{key}={value}")),
    st.tuples(config_keys, junk_values).map("=".join),
)


@FUZZ
@given(overrides=st.lists(overrides, max_size=5))
def test_config_overrides_fuzz_raise_only_config_errors(overrides):
    try:
        cfg = load_config(None, overrides)
    except ConfigError:
        return
    assert isinstance(cfg, Config)


sections = st.dictionaries(
    st.one_of(st.sampled_from(SECTIONS), st.text(max_size=8), st.integers()),
    st.one_of(st.dictionaries(st.one_of(st.sampled_from([k.split(".")[1] for k in KEYS]), st.text(max_size=8)),
                              json_values, max_size=5),
              json_values),
    max_size=4,
)


@FUZZ
@given(document=st.one_of(sections.map(lambda m: yaml.safe_dump(m, allow_unicode=True)),
                          st.text(max_size=80), st.binary(max_size=60)))
def test_config_files_fuzz_raise_only_config_errors(document, tmp_path):
    path = tmp_path / "fuzz.yaml"
    if isinstance(document, bytes):
        path.write_bytes(document)
    else:
        path.write_text(document)
    try:
        load_config(path)
    except ConfigError:
        return


# ----------------------------------------------------------------------------------------------- COCO

VALID_COCO = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 3},
               {"id": 2, "file_name": "missing.jpg", "width": 4, "height": 3}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 2}, {"id": 2, "image_id": 2, "category_id": 1}],
    "categories": [{"id": 1, "name": "cat", "supercategory": "animal"},
                   {"id": 2, "name": "dog", "supercategory": "animal"}],
}
replacements = st.one_of(st.integers(min_value=-1, max_value=3), st.sampled_from(["a.jpg", "cat", "1"]), json_values)


def node_paths(obj: object, path: tuple = ()) -> list[tuple]:
    """Every node of a JSON structure as its path of keys/indices (the root is ())."""
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    return [path] + [p for key, value in children for p in node_paths(value, (*path, key))]


@st.composite
def mutated(draw, document: object) -> object:
    """``document`` with one to three nodes deleted or replaced: mostly well-formed, wrong in one place."""
    document = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(node_paths(document)))
        if not path:
            document = draw(replacements)
            continue
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(replacements)
    return document


def check_reader_error(err: Exception, named: Path) -> None:
    assert isinstance(err, (FileNotFoundError, ValueError)), f"{type(err).__name__}: {err}"
    assert str(named) in str(err), f"the error does not name {named}: {err}"


@pytest.fixture
def coco_root(tmp_path) -> Path:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2014").mkdir()
    (tmp_path / "val2014" / "a.jpg").write_bytes(b"\xff\xd8 not decoded by the reader")
    return tmp_path


@FUZZ
@given(document=st.one_of(mutated(VALID_COCO).map(json.dumps), json_values.map(json.dumps), st.binary(max_size=40)))
def test_coco_reader_fuzz_raises_only_errors_naming_the_annotation_file(document, coco_root):
    path = coco_root / "annotations" / "instances_val2014.json"
    path.write_bytes(document if isinstance(document, bytes) else document.encode())
    try:
        index = read_coco(coco_root, "val", keep_empty=True)
    except Exception as err:  # noqa: BLE001 - the assertion below is the point
        check_reader_error(err, path)
        return
    assert all(r.file_name == "a.jpg" for r in index.records)


# ----------------------------------------------------------------------------------------------- VOC

voc_lines = st.one_of(
    st.tuples(st.sampled_from(["000001", "000002", "x", "", "000001 extra"]),
              st.sampled_from(["1", "0", "-1", "2", "", "one"])).map(" ".join),
    st.text(max_size=12),
)


@FUZZ
@given(files=st.dictionaries(st.sampled_from(VOC_CLASSES[:3]),
                             st.one_of(st.lists(voc_lines, max_size=3).map("\n".join).map(str.encode),
                                       st.binary(max_size=20)),
                             max_size=3))
def test_voc_reader_fuzz_raises_only_errors_naming_a_file(files, voc_writer, tmp_path_factory):
    root = voc_writer(tmp_path_factory.mktemp("voc"), {"test": {"000001": (("dog",), ()), "000002": ((), ())}})
    main = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    for name, content in files.items():
        (main / f"{name}_test.txt").write_bytes(content)
    try:
        read_voc(root, "test")
    except Exception as err:  # noqa: BLE001 - the assertion below is the point
        check_reader_error(err, main)  # the message names the class file at fault (all live in main/)
