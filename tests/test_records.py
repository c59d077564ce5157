"""retrieval/records.py: the one reader of record files a user names (JSON array, JSON lines, CSV)."""

from __future__ import annotations

import pytest

from mergeseek.errors import InputError
from mergeseek.retrieval.records import csv_rows, read_records

BOM = "\ufeff"


def _write(path, text):
    path.write_bytes((BOM + text).encode("utf-8"))
    return path


def test_a_json_array_gives_each_entry_with_the_line_it_starts_on(tmp_path):
    path = _write(tmp_path / "a.json", '[\n {"a": 1},\n\n {"b": [1,\n 2]}, 3\n]\n')
    got = read_records(path, "query file")
    assert [(r.line, r.value) for r in got] == [(2, {"a": 1}), (4, {"b": [1, 2]}), (5, 3)]
    assert got[1].where == f"{path}:4"
    assert read_records(_write(path, " [ ] "), "query file") == []


@pytest.mark.parametrize("text, line, needle", [
    ('[\n{"a": 1}\n{"b": 2}]', 3, "expected ',' or ']' after entry 1"),
    ("[1,]", 1, "Expecting value"),
    ('[\n{"a": nope}]', 2, "Expecting value"),
    ("[1]\nx", 2, "text after the array"),
    ('[{"a": 1}', 1, "expected ',' or ']'"),
])
def test_a_broken_json_array_is_one_line_naming_the_line(tmp_path, text, line, needle):
    path = _write(tmp_path / "a.json", text)
    with pytest.raises(InputError) as err:
        read_records(path, "ground-truth file")
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line} is not valid JSON") and needle in msg and len(msg.splitlines()) == 1


def test_json_lines_skip_blank_and_comment_lines_and_name_a_bad_one(tmp_path):
    path = _write(tmp_path / "q.jsonl", '{"a": 1}\n\n   \n# a note\n{"b": 2}\r\n')
    assert [(r.line, r.value) for r in read_records(path, "query file")] == [(1, {"a": 1}), (5, {"b": 2})]
    _write(path, '{"a": 1}\n\n{bad\n')
    with pytest.raises(InputError, match=f"^{path}:3 is not valid JSON .*; one JSON object per line$"):
        read_records(path, "query file")
    with pytest.raises(InputError, match=f"^{path}:3 is not valid JSON .*; give this$"):
        read_records(path, "query file", hint="give this")


def test_text_lines_go_to_the_callers_reader_and_json_lines_stay_json(tmp_path):
    path = _write(tmp_path / "q.tsv", 'q1\tkis\ta dog\n{"query_id": "q2"}\n')
    got = read_records(path, "query file", text_line=lambda line, where: (where, line.split("\t")))
    assert [r.value for r in got] == [(f"{path}:1", ["q1", "kis", "a dog"]), {"query_id": "q2"}]


def test_a_single_object_may_span_lines(tmp_path):
    path = _write(tmp_path / "answers.json", '\n{\n "q1": "ba",\n "q2": 4\n}\n')
    got = read_records(path, "answers file", single_object=True)
    assert [(r.line, r.value) for r in got] == [(2, {"q1": "ba", "q2": 4})]
    _write(path, '{\n "q1": "ba",\n "q2": \n}\n')
    with pytest.raises(InputError, match=f"^{path}:4 is not valid JSON"):
        read_records(path, "answers file", single_object=True)


def test_csv_tables_only_where_the_caller_takes_them(tmp_path):
    path = _write(tmp_path / "q.csv", 'query,video_id\r\nhello,v1\r\n\r\n"two\nlines",v2\r\n')
    got = read_records(path, "queries file", csv_tables=True)
    assert [(r.line, r.value) for r in got] == [(2, {"query": "hello", "video_id": "v1"}),
                                                 (5, {"query": "two\nlines", "video_id": "v2"})]
    tsv = _write(tmp_path / "tabs.csv", "q1\tkis\ta dog\n")  # tab-separated lines saved as .csv stay lines
    assert [r.value for r in read_records(tsv, "query file", text_line=lambda line, where: line)] == ["q1\tkis\ta dog"]


def test_csv_rows_stop_at_the_limit_and_name_what_is_wrong(tmp_path):
    path = tmp_path / "q1.csv"
    path.write_bytes(b"\xef\xbb\xbfV,1\n\nV,2\r\nV,3\n")
    assert csv_rows(path, "submission file") == [["V", "1"], ["V", "2"], ["V", "3"]]
    assert csv_rows(path, "submission file", limit=2) == [["V", "1"], ["V", "2"]]
    path.write_bytes(b"V,1\n" * 5000 + b"V,caf\xe9\n")  # the bad byte is past the first buffer
    with pytest.raises(InputError, match=r"^submission file .*q1.csv is not UTF-8 text \(byte 20005\); save it as UTF-8$"):
        csv_rows(path, "submission file")
    assert csv_rows(path, "submission file", limit=3) == [["V", "1"]] * 3  # never read that far
    path.write_text("V,1\nV," + "9" * 200_000 + "\n")
    with pytest.raises(InputError, match=r"^submission file .*q1.csv:2 is not valid CSV \(field larger"):
        csv_rows(path, "submission file")
    with pytest.raises(InputError, match="is not a file$"):
        csv_rows(tmp_path, "submission file")
