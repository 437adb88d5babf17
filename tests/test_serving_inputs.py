"""The served student never answers wrong in silence (issues 12 and 8): a feature name it does
not take, a missing one, inputs of the wrong rank or dtype and bare strings are refused naming
the input, string values are normalized, unknown values are counted, and the loaded file
answers many threads as it answers one. The pt2 package's encoding table (its Python reader in
front of the same numeric path, kind ``table``) behaves alike (issue 21)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading

import pytest
import torch

from features.vocab import FeatureVocabs, Vocabulary

from recdistill.export import (
    ParityRows,
    ServingInputs,
    ServingStudent,
    TableEncoder,
    export_torchscript,
    serving_inputs,
    write_encoding,
)

#: Run by a fresh python (torch alone): load the file, print the unknown counts of the inputs.
UNKNOWNS_IN_A_FRESH_PROCESS = r"""
import json, sys
import torch
served = torch.jit.load(sys.argv[1])
print(json.dumps(served.unknowns(*torch.load(sys.argv[2]))))
"""

#: The integer inputs: (dictionary, name).
ID_INPUTS = (("numbers", "user_id"), ("numbers", "item_id"), ("lengths", "genres"))
#: Every tensor input.
TENSOR_INPUTS = ID_INPUTS + (("numbers", "age"), ("numbers", "release_year"))
STRING_INPUTS = ("gender", "occupation", "zip_prefix", "genres")


@pytest.fixture(scope="module")
def served_file(trained_student, prepared, tmp_path_factory):
    path = tmp_path_factory.mktemp("serving") / "student.pt"
    export_torchscript(trained_student, prepared.vocabs, path, ParityRows.sample(prepared, 256))
    return path


@pytest.fixture(scope="module")
def eager(trained_student, prepared):
    return ServingStudent.from_student(trained_student, prepared.vocabs, (1.0, 5.0))


class TableServed:
    """The encoding table's Python reader in front of the served module's numeric path: what
    ``Pt2Student`` runs, without compiling the package."""

    def __init__(self, served: ServingStudent, path):
        self.encoder = TableEncoder.load(write_encoding(served.encoder, path))
        self.served = served

    def __call__(self, *args) -> torch.Tensor:
        return self.served.score(*self.encoder(*args))

    def unknowns(self, *args) -> dict[str, int]:
        return self.encoder.unknowns(*args)


@pytest.fixture(scope="module")
def models(served_file, eager):
    """The eager serving module, the saved and reloaded scripted one, and the encoding table in
    front of the eager numeric path: all must behave alike."""
    table = TableServed(eager, served_file.with_name("student.encoding.txt"))
    return {"eager": eager, "scripted": torch.jit.load(str(served_file)), "table": table}


@pytest.fixture(scope="module")
def rows(prepared) -> ServingInputs:
    """Three real rows (their genres: 1, 4 and 2 names)."""
    return serving_inputs(prepared.movielens.joined().head(3), prepared.vocabs)


@pytest.mark.parametrize("kind", ["eager", "scripted", "table"])
@pytest.mark.parametrize("where, name", TENSOR_INPUTS)
@pytest.mark.parametrize("reshape, shown",
                         [(lambda t: t[:, None], "[3, 1]"), (lambda t: t[0], "[]")],
                         ids=["2-D", "0-d"])  # fmt: skip
def test_a_tensor_input_of_the_wrong_rank_is_refused_naming_it(models, rows, kind, where, name,
                                                               reshape, shown):  # fmt: skip
    bad = rows.replace(where, name, reshape(getattr(rows, where)[name]))
    message = rf"serving input {where}\['{name}'\] must have shape \[B\].*got shape {re.escape(shown)}"
    with pytest.raises(Exception, match=message):
        models[kind](*bad.args)


@pytest.mark.parametrize("kind", ["eager", "scripted", "table"])
@pytest.mark.parametrize("where, name", ID_INPUTS)
def test_float_ids_are_refused_not_truncated(models, rows, kind, where, name):
    """Even whole floats (196.0) are refused: 196.7 would have been served as user 196."""
    bad = rows.replace(where, name, getattr(rows, where)[name].double())
    with pytest.raises(Exception, match=rf"serving input {where}\['{name}'\] must be an integer tensor"):
        models[kind](*bad.args)


@pytest.mark.parametrize("kind", ["eager", "scripted", "table"])
def test_a_feature_name_the_model_does_not_take_is_refused_naming_it(models, rows, kind):
    bad = rows.replace("strings", "gendr", rows.strings["gender"])
    with pytest.raises(Exception, match=r"strings\['gendr'\]: not a feature this model takes in "
                                        r"strings; it takes strings: gender, occupation"):  # fmt: skip
        models[kind](*bad.args)
    misplaced = rows.replace("strings", "age", ["49", "53", "23"])
    with pytest.raises(Exception, match=r"strings\['age'\].*\('age' goes in numbers\)"):
        models[kind](*misplaced.args)


@pytest.mark.parametrize("kind", ["eager", "scripted", "table"])
def test_a_missing_feature_is_refused_naming_it(models, rows, kind):
    numbers = {k: v for k, v in rows.numbers.items() if k != "release_year"}
    with pytest.raises(Exception, match=r"numbers\['release_year'\] is missing"):
        models[kind](*rows._replace(numbers=numbers).args)


@pytest.mark.parametrize("kind", ["eager", "scripted", "table"])
def test_every_integer_dtype_scores_alike(models, rows, kind):
    small = rows._replace(
        numbers={**rows.numbers, "age": rows.numbers["age"].to(torch.uint8),
                 "release_year": rows.numbers["release_year"].to(torch.int16),
                 "user_id": rows.numbers["user_id"].int()},
        lengths={"genres": rows.lengths["genres"].to(torch.int8)},
    )  # fmt: skip
    assert torch.equal(models[kind](*small.args), models[kind](*rows.args))


@pytest.mark.parametrize("name", STRING_INPUTS)
def test_a_bare_string_is_refused_where_a_list_of_strings_is_expected(rows, name):
    """Refused by ``ServingInputs.args``, naming the input."""
    bad = rows.replace("strings", name, "writer")
    with pytest.raises(ValueError, match=rf"serving input strings\['{name}'\] must be a list of strings"):
        bad.args


def test_the_scripted_module_sees_a_bare_string_as_its_characters(models, rows):
    """TorchScript converts a ``str`` passed as ``List[str]`` into its characters before the
    module runs, so the module cannot refuse it as such: the row count check does, unless the
    string has exactly ``B`` characters; then they are unknown values and counted as such."""
    scripted = models["scripted"]
    with pytest.raises(Exception, match=r"strings\['occupation'\] has 6 rows, numbers\['user_id'\] has 3"):
        scripted(*tuple(rows.replace("strings", "occupation", "writer")))
    assert scripted.unknowns(*tuple(rows.replace("strings", "occupation", "abc")))["occupation"] == 3


def _respelled(rows: ServingInputs) -> ServingInputs:
    """The same rows with other case and surrounding whitespace on every string value."""
    s = rows.strings
    return rows._replace(strings={
        "gender": [f" {g.lower()}\t" for g in s["gender"]],
        "occupation": [o.upper() + "\r\n" for o in s["occupation"]],
        "zip_prefix": [f"  {z} " for z in s["zip_prefix"]],
        "genres": [f" {g.swapcase()} " for g in s["genres"]],
    })  # fmt: skip


@pytest.mark.parametrize("kind", ["eager", "scripted", "table"])
def test_strings_match_regardless_of_case_and_surrounding_whitespace(models, rows, kind):
    model = models[kind]
    assert torch.equal(model(*_respelled(rows).args), model(*rows.args))
    assert set(model.unknowns(*_respelled(rows).args).values()) == {0}


def test_zip_codes_keep_their_case(models, prepared):
    """Only whitespace is stripped from a zip code: "e2a" is not the Canadian prefix "E2A"."""
    joined = prepared.movielens.joined()
    row = serving_inputs(joined.filter(joined["zip_code"].str.starts_with("E2A")).head(1), prepared.vocabs)
    lower = row.replace("strings", "zip_prefix", [z.lower() for z in row.strings["zip_prefix"]])
    assert models["scripted"].unknowns(*row.args)["zip_prefix"] == 0
    assert models["scripted"].unknowns(*lower.args)["zip_prefix"] == 1


def test_vocabularies_that_collide_after_normalization_fail_the_export(
    trained_student, prepared, tmp_path
):  # fmt: skip
    occupations = [("Writer" if o == "none" else o) for o in prepared.vocabs["occupation"].values]
    vocabs = FeatureVocabs(
        prepared.vocabs.spec,
        {**prepared.vocabs.vocabs, "occupation": Vocabulary("occupation", occupations)},
    )
    rows = ParityRows.sample(prepared, 8)
    with pytest.raises(ValueError, match="'occupation' has .*'writer'.* one value after fold_case"):
        export_torchscript(trained_student, vocabs, tmp_path / "x.pt", rows)


def _with_unknowns(rows: ServingInputs) -> ServingInputs:
    """Row 0: an unseen user and a missing age; row 1: an unseen occupation and zip code;
    row 2: an unseen item, year and one unseen genre name of its two."""
    n, s = rows.numbers, rows.strings
    return rows._replace(
        numbers={
            "user_id": torch.tensor([10**9, int(n["user_id"][1]), int(n["user_id"][2])]),
            "item_id": torch.tensor([int(n["item_id"][0]), int(n["item_id"][1]), -5]),
            "age": torch.tensor([math.nan, float(n["age"][1]), float(n["age"][2])]),
            "release_year": torch.tensor([float(n["release_year"][0]),
                                          float(n["release_year"][1]), 1800.0]),
        },
        strings={**s, "occupation": [s["occupation"][0], "astronaut", s["occupation"][2]],
                 "zip_prefix": [s["zip_prefix"][0], "", s["zip_prefix"][2]],
                 "genres": s["genres"][:-1] + ["Not-a-genre"]},
    )  # fmt: skip


EXPECTED_UNKNOWNS = {"user_id": 1, "item_id": 1, "age": 1, "gender": 0, "occupation": 1,
                     "zip_prefix": 1, "release_year": 1, "genres": 1}  # fmt: skip


@pytest.mark.parametrize("kind", ["eager", "scripted", "table"])
def test_unknowns_counts_the_values_scored_as_unknown_per_feature(models, rows, kind):
    assert rows.lengths["genres"].tolist() == [1, 4, 2]
    assert models[kind].unknowns(*_with_unknowns(rows).args) == EXPECTED_UNKNOWNS
    assert set(models[kind].unknowns(*rows.args).values()) == {0}


def test_unknowns_from_the_saved_file_in_a_fresh_process(served_file, rows, tmp_path):
    data = tmp_path / "inputs.pt"
    torch.save(list(_with_unknowns(rows).args), data)
    out = subprocess.run(
        [sys.executable, "-c", UNKNOWNS_IN_A_FRESH_PROCESS, str(served_file), str(data)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == EXPECTED_UNKNOWNS


def _random_batches(prepared, count: int, seed: int) -> list[ServingInputs]:
    """``count`` batches of 1..16 real rows drawn at random (with their genres)."""
    joined = prepared.movielens.joined()
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 17, (count,), generator=gen).tolist()
    return [serving_inputs(joined[torch.randint(len(joined), (n,), generator=gen).tolist()],
                           prepared.vocabs) for n in sizes]  # fmt: skip


def test_the_loaded_file_answers_8_threads_as_it_answers_one(served_file, prepared):
    """8 threads x 300 calls on one freshly loaded module (its first calls, when TorchScript
    profiles and optimizes the graph, included): every output equals the sequential one."""
    batches = _random_batches(prepared, 64, seed=7)
    sequential = torch.jit.load(str(served_file))
    expected = [sequential(*b.args) for b in batches]
    served = torch.jit.load(str(served_file))
    mismatches: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def client(thread: int) -> None:
        try:
            for call in range(300):
                i = (thread * 300 + call * 7) % len(batches)
                if not torch.equal(served(*batches[i].args), expected[i]):
                    mismatches.append((thread, call))
        except BaseException as err:  # a failing call must fail the test, not vanish in the thread
            errors.append(err)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads)
    assert mismatches == []


# ---------------------------------------------------------------- any input: a rating or a clear error

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TEXT = st.text(max_size=12)  # any unicode: empty, whitespace, case, emoji, control characters


@st.composite
def raw_rows(draw):
    """A batch of 0-8 rows of arbitrary raw values, consistent in its lengths."""
    size = draw(st.integers(min_value=0, max_value=8))
    ints = st.lists(INT64, min_size=size, max_size=size)
    floats = st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=size, max_size=size)
    texts = st.lists(TEXT, min_size=size, max_size=size)
    genre_lengths = draw(st.lists(st.integers(0, 4), min_size=size, max_size=size))
    return ServingInputs(
        numbers={"user_id": torch.tensor(draw(ints), dtype=torch.int64),
                 "item_id": torch.tensor(draw(ints), dtype=torch.int64),
                 "age": torch.tensor(draw(floats), dtype=torch.float64),
                 "release_year": torch.tensor(draw(ints), dtype=torch.int64)},
        strings={"gender": draw(texts), "occupation": draw(texts), "zip_prefix": draw(texts),
                 "genres": draw(st.lists(TEXT, min_size=sum(genre_lengths),
                                         max_size=sum(genre_lengths)))},
        lengths={"genres": torch.tensor(genre_lengths, dtype=torch.int64)},
    )  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=raw_rows())
def test_any_consistent_raw_rows_get_finite_ratings_in_range_and_counted_unknowns(models, inputs):
    """Whatever the values (huge or negative ids, infinite or NaN numbers, odd strings), a
    well-formed batch is scored: one finite rating per row inside the training range, the same
    from the saved file, and every value the vocabularies do not know is counted."""
    scripted = models["scripted"]
    ratings = scripted(*inputs.args)
    assert ratings.shape == (inputs.batch_size,) and bool(torch.isfinite(ratings).all())
    assert bool(((ratings >= 1.0) & (ratings <= 5.0)).all())
    assert torch.equal(ratings, models["eager"](*inputs.args))
    assert torch.equal(ratings, models["table"](*inputs.args))
    counts = scripted.unknowns(*inputs.args)
    assert counts == models["table"].unknowns(*inputs.args)
    assert all(0 <= n <= max(inputs.batch_size, len(inputs.strings["genres"]))
               for n in counts.values())  # fmt: skip


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=raw_rows(), cut=st.sampled_from([("numbers", "user_id"), ("strings", "gender"),
                                               ("strings", "genres"), ("lengths", "genres")]))
def test_any_batch_with_inconsistent_lengths_is_a_clear_error(models, inputs, cut):
    """One input a row short (or genre names that do not add up) is refused, never scored."""
    where, name = cut
    value = getattr(inputs, where)[name]
    if len(value) == 0:
        value = value + ["x"] if isinstance(value, list) else torch.tensor([1])
    else:
        value = value[1:]
    for kind in ("scripted", "table"):
        with pytest.raises(Exception, match=r"serving input"):
            models[kind](*inputs.replace(where, name, value).args)
