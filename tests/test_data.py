"""Data layer: readers, splits, statistics and every bad-input case (each checks its message)."""

import json

import pytest
from conftest import shared_dataset

from onerec_dist.config import from_mapping
from onerec_dist.data.config import DataConfig
from onerec_dist.data.readers import DataError, parse_semantic_id
from onerec_dist.data.splits import leave_one_out, load_dataset, make_splits, statistics


def letter_dir(tmp_path, inter, items=None, index=None, name="Toy"):
    (tmp_path / f"{name}.inter.json").write_text(inter if isinstance(inter, str) else json.dumps(inter))
    if items is not None:
        (tmp_path / f"{name}.item.json").write_text(items if isinstance(items, str) else json.dumps(items))
    if index is not None:
        (tmp_path / f"{name}.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return tmp_path


def cfg(**kw):
    kw.setdefault("format", "letter")
    kw.setdefault("name", "Toy")
    return from_mapping(DataConfig, kw, "data")


ITEMS = {str(i): {"title": f"t{i}", "description": "d", "brand": "b", "categories": "x,y"} for i in range(5)}


# ---------------------------------------------------------------- splits


def test_leave_one_out_hand_worked():
    # seq a b c d e (n=5): test (abcd -> e), valid (abc -> d), train t=1..n-3: (a -> b), (ab -> c).
    splits = leave_one_out({"u": [0, 1, 2, 3, 4]}, max_history=50)
    assert list(zip(splits["test"].histories, splits["test"].targets)) == [([0, 1, 2, 3], 4)]
    assert list(zip(splits["valid"].histories, splits["valid"].targets)) == [([0, 1, 2], 3)]
    assert list(zip(splits["train"].histories, splits["train"].targets)) == [([0], 1), ([0, 1], 2)]
    # max_history=2 keeps the last two items of every history.
    capped = leave_one_out({"u": [0, 1, 2, 3, 4]}, max_history=2)
    assert capped["test"].histories == [[2, 3]] and capped["train"].histories == [[0], [0, 1]]


def test_letter_reader_and_statistics(tmp_path):
    root = letter_dir(tmp_path, {"0": [0, 1, 2, 3], "1": [4, 3, 2]}, ITEMS,
                      {str(i): [f"<a_{i}>", f"<b_{i}>"] for i in range(5)})
    data = load_dataset(cfg(dir=str(root)))
    assert data.catalogue.titles[2] == "t2" and data.catalogue.categories[0] == ["x", "y"]
    assert data.catalogue.semantic_ids.tolist()[3] == [3, 3]
    splits = make_splits(data, cfg(dir=str(root)))
    stats = statistics(data, splits)
    # 2 users, 7 interactions, 3.5 per user; train = (4-3) + (3-3) = 1 example.
    assert (stats["num_users"], stats["num_items"], stats["num_interactions"]) == (2, 5, 7)
    assert stats["avg_seq_len"] == 3.5 and stats["splits"] == {"train": 1, "valid": 2, "test": 2}


# ---------------------------------------------------------------- bad input, each with its message


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"interactions file not found: .*Toy\.inter\.json"):
        load_dataset(cfg(dir=str(tmp_path)))


def test_malformed_json_names_line(tmp_path):
    root = letter_dir(tmp_path, '{"0": [1, 2,\n  3,, 4]}')
    with pytest.raises(DataError, match=r"Toy\.inter\.json: malformed JSON at line 2"):
        load_dataset(cfg(dir=str(root)))


def test_duplicate_item_ids_in_json(tmp_path):
    root = letter_dir(tmp_path, {"0": [0, 1, 2]}, '{"0": {"title": "a"}, "1": {}, "0": {"title": "b"}}')
    with pytest.raises(DataError, match=r"Toy\.item\.json: duplicate key '0'"):
        load_dataset(cfg(dir=str(root)))


def test_non_numeric_item_id(tmp_path):
    root = letter_dir(tmp_path, {"0": [0, "x7", 2]})
    with pytest.raises(DataError, match=r"user '0', position 1: expected an integer id, got 'x7'"):
        load_dataset(cfg(dir=str(root)))


def test_unknown_item_error_and_counted_drop(tmp_path):
    root = letter_dir(tmp_path, {"0": [0, 1, 9, 2, 3]}, ITEMS)
    with pytest.raises(DataError, match=r"references item 9 which is not in the catalogue \(5 items"):
        load_dataset(cfg(dir=str(root)))
    data = load_dataset(cfg(dir=str(root), on_unknown_item="drop"))
    assert data.sequences["0"] == [0, 1, 2, 3]
    assert data.report.counts == {"interaction with an item absent from the catalogue": 1}


def test_ragged_semantic_ids(tmp_path):
    index = {"0": ["<a_1>", "<b_2>"], "1": ["<a_1>", "<b_3>"], "2": ["<a_2>"], "3": ["<a_3>", "<b_1>"],
             "4": ["<a_4>", "<b_1>"]}
    root = letter_dir(tmp_path, {"0": [0, 1, 2, 3]}, ITEMS, index)
    with pytest.raises(DataError, match=r"item 2: semantic ID has 1 levels, expected 2"):
        load_dataset(cfg(dir=str(root)))
    data = load_dataset(cfg(dir=str(root), on_bad_sid="drop_sid"))
    assert data.catalogue.semantic_ids[2].tolist() == [-1, -1]
    assert data.report.counts["semantic ID with a different number of levels (ID dropped)"] == 1


def test_duplicate_semantic_ids(tmp_path):
    # items 0 and 1 share <a_1><b_2>: 2 items, 1 shared ID.
    index = {str(i): ["<a_1>", "<b_2>"] if i < 2 else [f"<a_{i}>", "<b_0>"] for i in range(5)}
    root = letter_dir(tmp_path, {"0": [0, 1, 2, 3]}, ITEMS, index)
    with pytest.raises(DataError, match=r"2 items share a semantic ID with another item \(1 IDs\)"):
        load_dataset(cfg(dir=str(root), on_duplicate_sid="error"))
    data = load_dataset(cfg(dir=str(root)))  # default: report and keep
    assert data.report.counts["item sharing its semantic ID with another item (kept; `onerec sid` resolves "
                              "collisions)"] == 2
    dropped = load_dataset(cfg(dir=str(root), on_duplicate_sid="drop_sid"))
    assert dropped.catalogue.semantic_ids[:2].tolist() == [[-1, -1], [-1, -1]]


def test_semantic_id_parsing():
    assert parse_semantic_id(["<a_12>", "<b_7>"], "f", "0") == [12, 7]
    assert parse_semantic_id("<a_12><b_7><c_0>", "f", "0") == [12, 7, 0]
    with pytest.raises(DataError, match="levels .* are not in order"):
        parse_semantic_id(["<b_1>", "<a_2>"], "f", "3")
    with pytest.raises(DataError, match="cannot parse semantic ID"):
        parse_semantic_id(["a12"], "f", "3")


def test_short_users_dropped_or_error(tmp_path):
    root = letter_dir(tmp_path, {"0": [0, 1, 2, 3], "1": [4, 3]})
    c = cfg(dir=str(root))
    data = load_dataset(c)
    make_splits(data, c)
    assert list(data.sequences) == ["0"]
    assert data.report.counts == {"user with fewer than 3 interactions (user dropped)": 1}
    c_err = cfg(dir=str(root), on_short_user="error")
    with pytest.raises(DataError, match=r"1 users have fewer than data.min_seq_len=3 .* user '1' with 2"):
        make_splits(load_dataset(c_err), c_err)


def test_config_errors_name_field_and_allowed_values():
    with pytest.raises(ValueError, match=r"data.on_unknown_item='skip' is not allowed; allowed values: 'drop', 'error'"):
        cfg(dir="x", on_unknown_item="skip")
    with pytest.raises(ValueError, match=r"unknown key\(s\) colour in data; valid keys: "):
        cfg(dir="x", colour=1)
    with pytest.raises(ValueError, match=r"data.max_history must be int, got 'ten'"):
        cfg(dir="x", max_history="ten")
    with pytest.raises(ValueError, match=r"data.dir: is required for data.format=letter"):
        cfg()


# ---------------------------------------------------------------- plain interactions + CSV


def test_interactions_jsonl_orders_by_time_and_checks_items(tmp_path):
    rows = [{"user": "u1", "item": "B", "timestamp": 5}, {"user": "u1", "item": "A", "timestamp": 1},
            {"user": "u1", "item": "C", "timestamp": 9}, {"user": "u2", "item": "A", "timestamp": 3}]
    (tmp_path / "inter.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = [{"item": i, "title": f"title {i}"} for i in "ABC"]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(r) for r in items))
    c = from_mapping(DataConfig, {"format": "interactions", "dir": str(tmp_path),
                                  "interactions_file": "inter.jsonl", "items_file": "items.jsonl"}, "data")
    data = load_dataset(c)
    assert [data.catalogue.item_ids[i] for i in data.sequences["u1"]] == ["A", "B", "C"]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(r) for r in items[:2]))
    with pytest.raises(DataError, match=r"item 'C' is not in the items file items.jsonl"):
        load_dataset(c)
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(r) for r in items + items[:1]))
    with pytest.raises(DataError, match=r"items.jsonl: line 4: duplicate item id 'A'"):
        load_dataset(c)
    (tmp_path / "inter.jsonl").write_text('{"user": "u1", "item": "A", "timestamp": "yesterday"}\n')
    with pytest.raises(DataError, match=r"inter.jsonl: line 1: timestamp='yesterday' is not a number"):
        load_dataset(c)


def test_interactions_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user": ["a", "a", "a"], "item": [3, 1, 2], "timestamp": [2, 1, 3]}),
                   tmp_path / "inter.parquet")
    c = from_mapping(DataConfig, {"format": "interactions", "dir": str(tmp_path),
                                  "interactions_file": "inter.parquet"}, "data")
    data = load_dataset(c)
    # Without an items file the catalogue is the items seen, in natural id order: 1, 2, 3.
    assert data.catalogue.item_ids == ["1", "2", "3"]
    assert [data.catalogue.item_ids[i] for i in data.sequences["a"]] == ["1", "3", "2"]


def write_csv_release(root, rows, split="test"):
    (root / split).mkdir(parents=True)
    (root / "index").mkdir(exist_ok=True)
    (root / "index" / "Toy.item.json").write_text(json.dumps(ITEMS))
    header = "user_id,history_item_title,item_title,history_item_id,item_id,history_item_sid,item_sid\n"
    (root / split / "Toy.csv").write_text(header + "".join(rows))


def test_minionerec_csv_reader_and_missing_split(tmp_path):
    write_csv_release(tmp_path, ['u1,"[]",t,"[0, 1]",2,"[]",x\n', 'u2,"[]",t,"[3]",4,"[]",x\n'])
    c = from_mapping(DataConfig, {"format": "minionerec", "name": "Toy", "dir": str(tmp_path), "split": "given"})
    data = load_dataset(c)
    splits = make_splits(data, c)
    assert splits["train"] is None and splits["valid"] is None
    assert splits["test"].histories == [[0, 1], [3]] and splits["test"].targets == [2, 4]
    assert statistics(data, splits)["missing_splits"] == ["train", "valid"]


def test_minionerec_csv_bad_rows(tmp_path):
    write_csv_release(tmp_path, ['u1,"[]",t,"[0, 1",2,"[]",x\n'])
    c = from_mapping(DataConfig, {"format": "minionerec", "name": "Toy", "dir": str(tmp_path), "split": "given"})
    with pytest.raises(DataError, match=r"Toy.csv: line 2: history_item_id '\[0, 1' is not a list literal"):
        load_dataset(c)


def test_minionerec_csv_nonnumeric_target(tmp_path):
    write_csv_release(tmp_path, ['u1,"[]",t,"[0, 1]",abc,"[]",x\n'])
    c = from_mapping(DataConfig, {"format": "minionerec", "name": "Toy", "dir": str(tmp_path), "split": "given"})
    with pytest.raises(DataError, match=r"line 2, item_id: expected an integer id, got 'abc'"):
        load_dataset(c)


# ---------------------------------------------------------------- real datasets (skip without ../shared)


@pytest.mark.shared_data
@pytest.mark.parametrize("folder,name,expected", [
    ("scientific", "Scientific", (8317, 4344, 58492)),
    ("beauty", "Beauty", (22363, 12101, 198502)),
])
def test_prepare_real_letter_datasets(tmp_path, folder, name, expected):
    from onerec_dist.cli import main

    path = shared_dataset(folder)
    assert main(["prepare", "data=letter", f"data.dir={path}", f"data.name={name}", f"output_dir={tmp_path}"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["num_users"], summary["num_items"], summary["num_interactions"]) == expected
    # Leave-one-out: one valid and one test example per user; train = interactions - 3 per user.
    assert summary["splits"] == {"train": expected[2] - 3 * expected[0], "valid": expected[0], "test": expected[0]}
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "test.parquet").is_file()


@pytest.mark.shared_data
def test_prepare_real_minionerec(tmp_path, capsys):
    from onerec_dist.cli import main

    path = shared_dataset("industrial-minionerec")
    argv = ["prepare", "data=minionerec", f"data.dir={path}", "data.name=Industrial_and_Scientific",
            f"output_dir={tmp_path}"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_items"] == 3686
    assert summary["splits"] == {"train": None, "valid": 4532, "test": 4533}
    assert summary["missing_splits"] == ["train"]
    assert "the train split is absent" in capsys.readouterr().out
    # 3686 items, 3670 distinct IDs: the shared IDs are counted and reported, not hidden.
    reported = [r for r in summary["dropped_or_repaired"] if "sharing its semantic ID" in r]
    assert reported and summary["dropped_or_repaired"][reported[0]]["count"] >= 3686 - 3670
