"""Case loaders: every accepted format, derived ids, and every error path."""
from __future__ import annotations

import csv
import json
import os
import stat
import time
import warnings
from pathlib import Path

import pytest

from rlhf_core.clinical import case_record, cases as cases_mod
from rlhf_core.clinical.cases import (
    Case,
    CaseFormatError,
    CaseFormatWarning,
    SafetyInfo,
    default_cases_dir,
    load_cases,
    load_library,
    save_cases_jsonl,
)


# An unexpected CaseFormatWarning fails the test; expected ones are caught with pytest.warns.
pytestmark = pytest.mark.filterwarnings("error::rlhf_core.clinical.cases.CaseFormatWarning")


# -- helpers -----------------------------------------------------------------

def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def load_error(path: Path) -> CaseFormatError:
    with pytest.raises(CaseFormatError) as info:
        load_cases(path)
    return info.value


def assert_names(err: CaseFormatError, path: Path, where: str | None, *problem: str) -> None:
    """The message names the file, the line/row (e.g. "line 3") and the problem."""
    msg = str(err)
    assert str(path) in msg, msg
    if where is not None:
        assert where in msg, msg
        unit, pos = where.split(" ")
        assert (err.unit, err.line) == (unit, int(pos))
    for words in problem:
        assert words.lower() in msg.lower(), msg


def free(i: int = 1, **kw) -> dict:
    rec = {"id": f"c{i}", "question": f"Question {i}?", "answer": f"answer {i}"}
    rec.update(kw)
    return rec


MEDQA = {
    "question": "A 60-year-old man has crushing chest pain. What is the diagnosis?",
    "answer": "Myocardial infarction",
    "options": {"A": "Pericarditis", "B": "Aortic dissection", "C": "Myocardial infarction",
                "D": "Pulmonary embolism"},
    "meta_info": "step1",
    "answer_idx": "C",
}


def medmcqa(i: int, cop, **kw) -> dict:
    rec = {"id": f"mm-{i}", "question": f"MedMCQA question {i}?", "opa": "alpha",
           "opb": "beta", "opc": "gamma", "opd": "delta", "cop": cop,
           "choice_type": "single", "exp": "explanation", "subject_name": "Medicine",
           "topic_name": None}
    rec.update(kw)
    return rec


# -- round trips: our JSONL / JSON / CSV --------------------------------------

def sample_cases() -> list[Case]:
    return [
        Case(id="ft-1", question="Fever, neck stiffness and a petechial rash. Diagnosis?",
             answer="meningococcal meningitis", aliases=["meningococcal disease", "IMD"],
             distractors=["viral meningitis"], specialty="infectious disease",
             icd10="A39.0", difficulty="hard",
             safety=SafetyInfo(conditions=["asthma"], allergies=["penicillin"],
                               medications=["warfarin"], pregnant=True, emergency=True,
                               red_flags=["emergency|urgent|immediately", "antibiotics"])),
        Case(id="mc-1", question="Which murmur radiates to the carotids?",
             answer="aortic stenosis",
             options=["mitral regurgitation", "aortic stenosis", "VSD", "tricuspid regurgitation"],
             answer_idx=1, specialty="cardiology", difficulty="easy"),
        # characters that tend to break line-based formats: quotes, pipes, U+2028, non-ASCII
        Case(id="odd-1", question='He said "it hurts" \u2028 at night | in the légs?',
             answer="restless legs syndrome", aliases=["Willis–Ekbom disease"]),
    ]


def test_our_jsonl_round_trip(tmp_path):
    cases = sample_cases()
    path = save_cases_jsonl(cases, tmp_path / "sub" / "ours.jsonl")
    assert path == tmp_path / "sub" / "ours.jsonl"
    assert len(path.read_text(encoding="utf-8").rstrip("\n").split("\n")) == len(cases)
    assert load_cases(path) == cases
    # and again: saving what was loaded gives the same file
    again = save_cases_jsonl(load_cases(path), tmp_path / "again.jsonl")
    assert again.read_bytes() == path.read_bytes()
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]


def test_save_cases_jsonl_file_mode(tmp_path):
    # the temporary file is private (0600); the saved file must not stay that way
    path = save_cases_jsonl(sample_cases(), tmp_path / "lib.jsonl")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.chmod(path, 0o664)
    save_cases_jsonl(sample_cases()[:1], path)  # replacing keeps the existing mode
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    assert [c.id for c in load_cases(path)] == ["ft-1"]


def test_our_json_array_round_trip(tmp_path):
    cases = sample_cases()
    path = tmp_path / "ours.json"
    path.write_text(json.dumps([c.to_dict() for c in cases], indent=2), encoding="utf-8")
    assert load_cases(path) == cases
    # a .jsonl file may also hold a JSON array
    path2 = tmp_path / "array.jsonl"
    path2.write_text(json.dumps([c.to_dict() for c in cases]), encoding="utf-8")
    assert load_cases(path2) == cases


def test_json_file_with_one_object_and_json_lines(tmp_path):
    one = tmp_path / "one.json"
    one.write_text("\n\n" + json.dumps(free(1), indent=2), encoding="utf-8")
    [case] = load_cases(one)
    assert case.id == "c1" and case.answer == "answer 1"
    # published MedMCQA "*.json" files are really JSON lines
    lines = write_jsonl(tmp_path / "lines.json", [free(1), free(2)])
    assert [c.id for c in load_cases(lines)] == ["c1", "c2"]


def test_our_csv(tmp_path):
    cases = sample_cases()
    header = ["id", "question", "answer", "aliases", "distractors", "options", "answer_idx",
              "specialty", "icd10", "difficulty", "safety"]
    rows = [[c.id, c.question, c.answer, "|".join(c.aliases), "|".join(c.distractors),
             "|".join(c.options or []), "" if c.answer_idx is None else c.answer_idx,
             c.specialty, c.icd10 or "", c.difficulty,
             json.dumps(c.safety.to_dict())] for c in cases]
    path = write_csv(tmp_path / "ours.csv", header, rows)
    assert load_cases(path) == cases


def test_csv_header_is_case_insensitive_and_defaults_apply(tmp_path):
    path = write_csv(tmp_path / "min.csv", ["Question", " Answer "],
                     [["What causes scurvy?", "vitamin C deficiency"], ["", ""],
                      ["Second?", "second answer"]])
    first, second = load_cases(path)
    assert first == Case(id="min-R2", question="What causes scurvy?",
                         answer="vitamin C deficiency")
    assert first.aliases == [] and first.distractors == [] and first.options is None
    assert first.specialty == "general" and first.difficulty == "medium"
    assert first.safety == SafetyInfo()
    assert second.id == "min-R4"  # the blank row still counts as a row


def test_missing_fields_get_defaults(tmp_path):
    path = write_jsonl(tmp_path / "bare.jsonl", [{"question": "Q?", "answer": "A"}])
    [case] = load_cases(path)
    assert case == Case(id="bare-L1", question="Q?", answer="A")
    assert case.aliases == [] and case.distractors == [] and case.icd10 is None


# -- MedQA ---------------------------------------------------------------------

def test_medqa_dict_options(tmp_path):
    path = write_jsonl(tmp_path / "medqa_test.jsonl", [MEDQA])
    [case] = load_cases(path)
    assert case.options == ["Pericarditis", "Aortic dissection", "Myocardial infarction",
                            "Pulmonary embolism"]
    assert case.answer_idx == 2 and case.answer == "Myocardial infarction"
    assert case.answer == case.options[case.answer_idx]
    assert case.is_multiple_choice
    assert case.id == "medqa_test-L1"  # published MedQA has no ids


def test_medqa_dict_options_in_any_key_order(tmp_path):
    rec = dict(MEDQA, options={"C": "Myocardial infarction", "A": "Pericarditis",
                               "B": "Aortic dissection"})
    [case] = load_cases(write_jsonl(tmp_path / "m.jsonl", [rec]))
    assert case.options == ["Pericarditis", "Aortic dissection", "Myocardial infarction"]
    assert case.answer_idx == 2


def test_medqa_options_string_with_blank_and_stray_lines_warns(tmp_path):
    rec = dict(MEDQA, options="A. Pericarditis\n\nB) Aortic dissection\n"
                              "(see figure 2)\nC: Myocardial infarction\n  \n(D) Pulmonary embolism")
    path = write_jsonl(tmp_path / "medqa_str.jsonl", [free(1), rec])
    with pytest.warns(CaseFormatWarning) as record:
        cases = load_cases(path)
    case = cases[1]
    assert case.options == ["Pericarditis", "Aortic dissection", "Myocardial infarction",
                            "Pulmonary embolism"]
    assert case.answer_idx == 2 and case.answer == "Myocardial infarction"
    [w] = [w for w in record if issubclass(w.category, CaseFormatWarning)]
    msg = str(w.message)
    assert str(path) in msg and "line 2" in msg
    assert "2 blank line(s)" in msg and "stray" in msg and "(see figure 2)" in msg


def test_clean_options_string_does_not_warn(tmp_path):
    rec = dict(MEDQA, options="A. Pericarditis\nB. Aortic dissection\nC. Myocardial infarction")
    path = write_jsonl(tmp_path / "clean.jsonl", [rec])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [case] = load_cases(path)
    assert case.answer_idx == 2


def test_options_string_forms(tmp_path):
    recs = [
        # "|"-separated, no letters
        {"id": "p", "question": "Q?", "options": "x | y | z", "answer": "y"},
        # lettered pieces in one "|"-separated line
        {"id": "lp", "question": "Q?", "options": "A. x|B. y|C. z", "answer": "C"},
        # one option per line, unlettered; a plain option that looks lettered ("E. coli")
        {"id": "nl", "question": "Q?", "options": "E. coli sepsis\nGroup B strep\nListeria",
         "answer": "Listeria"},
        # lettered lines out of order are kept in letter order
        {"id": "ord", "question": "Q?", "options": "B. y\nA. x", "answer_idx": "B"},
    ]
    by_id = {c.id: c for c in load_cases(write_jsonl(tmp_path / "forms.jsonl", recs))}
    assert (by_id["p"].options, by_id["p"].answer_idx) == (["x", "y", "z"], 1)
    assert (by_id["lp"].options, by_id["lp"].answer_idx) == (["x", "y", "z"], 2)
    assert by_id["nl"].options == ["E. coli sepsis", "Group B strep", "Listeria"]
    assert by_id["nl"].answer_idx == 2
    assert (by_id["ord"].options, by_id["ord"].answer) == (["x", "y"], "y")


@pytest.mark.parametrize("answer", ["C. Myocardial infarction", "C) myocardial infarction.",
                                    "(C) Myocardial infarction", "C: Myocardial  infarction"])
def test_answer_carrying_its_letter(tmp_path, answer):
    for with_idx in (True, False):
        rec = dict(MEDQA, answer=answer)
        if not with_idx:
            del rec["answer_idx"]
        [case] = load_cases(write_jsonl(tmp_path / "lettered.jsonl", [rec]))
        assert case.answer == "Myocardial infarction" and case.answer_idx == 2


@pytest.mark.parametrize("answer", ["C", "c", "(C)", "C."])
def test_bare_letter_answer(tmp_path, answer):
    rec = dict(MEDQA, answer=answer)
    del rec["answer_idx"]
    [case] = load_cases(write_jsonl(tmp_path / "bare.jsonl", [rec]))
    assert case.answer == "Myocardial infarction" and case.answer_idx == 2
    # with an answer_idx that agrees
    rec["answer_idx"] = "C"
    [case] = load_cases(write_jsonl(tmp_path / "bare2.jsonl", [rec]))
    assert case.answer_idx == 2


def test_answer_idx_forms(tmp_path):
    base = {"question": "Q?", "options": ["x", "y", "z"]}
    recs = [dict(base, id="int", answer_idx=1), dict(base, id="str", answer_idx="1"),
            dict(base, id="float", answer_idx=1.0), dict(base, id="letter", answer_idx="b"),
            dict(base, id="text", answer="Y")]
    cases = load_cases(write_jsonl(tmp_path / "idx.jsonl", recs))
    assert [(c.answer, c.answer_idx) for c in cases] == [("y", 1)] * 5


# -- MedMCQA -------------------------------------------------------------------

def test_medmcqa_cop_one_based(tmp_path):
    # the files published with the paper: cop 1-4
    path = write_jsonl(tmp_path / "dev.json", [medmcqa(1, 1), medmcqa(2, 4), medmcqa(3, 2)])
    cases = load_cases(path)
    assert [c.answer_idx for c in cases] == [0, 3, 1]
    assert [c.answer for c in cases] == ["alpha", "delta", "beta"]
    assert cases[0].options == ["alpha", "beta", "gamma", "delta"]
    assert cases[0].specialty == "medicine" and cases[0].id == "mm-1"


def test_medmcqa_cop_zero_based(tmp_path):
    # the Hugging Face copy: cop 0-3; one 0 anywhere makes the whole file 0-based
    path = write_jsonl(tmp_path / "hf.jsonl", [medmcqa(1, 1), medmcqa(2, 3), medmcqa(3, 0)])
    cases = load_cases(path)
    assert [c.answer_idx for c in cases] == [1, 3, 0]
    assert [c.answer for c in cases] == ["beta", "delta", "alpha"]


def test_medmcqa_cop_only_1_to_3_is_one_based_with_a_warning(tmp_path):
    # ambiguous: read as 1-based like the published files, and say so
    path = write_jsonl(tmp_path / "small.jsonl", [free(9), medmcqa(1, 1), medmcqa(2, 3)])
    with pytest.warns(CaseFormatWarning) as record:
        cases = load_cases(path)
    assert [c.answer_idx for c in cases[1:]] == [0, 2]
    [w] = record
    assert str(path) in str(w.message) and "line 2" in str(w.message)
    assert "1-based" in str(w.message)
    # letters only: no base involved, no warning
    assert [c.answer_idx for c in load_cases(
        write_jsonl(tmp_path / "letters_only.jsonl", [medmcqa(1, "b")]))] == [1]


def test_medmcqa_cop_as_letter_and_string_and_csv(tmp_path):
    path = write_jsonl(tmp_path / "letters.jsonl",
                       [medmcqa(1, "c"), medmcqa(2, "4"), medmcqa(3, 2.0)])
    assert [c.answer_idx for c in load_cases(path)] == [2, 3, 1]
    csv_path = write_csv(tmp_path / "mm.csv", ["question", "opa", "opb", "opc", "opd", "cop"],
                         [["Q1?", "a", "b", "c", "d", "2"], ["Q2?", "a", "b", "c", "d", "4"]])
    cases = load_cases(csv_path)
    assert [(c.id, c.answer) for c in cases] == [("mm-R2", "b"), ("mm-R3", "d")]


def test_medmcqa_mixed_cop_bases_rejected(tmp_path):
    path = write_jsonl(tmp_path / "mixed.json", [medmcqa(1, 2), medmcqa(2, 0), medmcqa(3, 4)])
    err = load_error(path)
    assert_names(err, path, "line 2", "0- or 1-based", "line 3")


def test_medmcqa_cop_out_of_range(tmp_path):
    path = write_jsonl(tmp_path / "oor.json", [medmcqa(1, 0), medmcqa(2, 5)])
    assert_names(load_error(path), path, "line 2", "cop 5", "out of range", "0-based")
    path = write_jsonl(tmp_path / "oor1.json", [medmcqa(1, 4), medmcqa(2, -1)])
    assert_names(load_error(path), path, "line 2", "cop -1", "out of range", "1-based")
    path = write_jsonl(tmp_path / "oor_letter.json", [medmcqa(1, "e")])
    assert_names(load_error(path), path, "line 1", "cop letter E is not among the options")
    path = write_jsonl(tmp_path / "bad_cop.json", [medmcqa(1, 1), medmcqa(2, "two")])
    assert_names(load_error(path), path, "line 2", "cop must be an integer")


def test_medmcqa_missing_option_field(tmp_path):
    rec = medmcqa(1, 1)
    del rec["opd"]
    path = write_jsonl(tmp_path / "noopd.json", [medmcqa(0, 4), rec])
    assert_names(load_error(path), path, "line 2", "opd")


# -- derived ids -----------------------------------------------------------------

def test_derived_ids_are_stable(tmp_path):
    recs = [{"question": "Q1?", "answer": "a"}, {"question": "Q2?", "answer": "b"}]
    path = write_jsonl(tmp_path / "medqa_train.jsonl", recs)
    first = [c.id for c in load_cases(path)]
    second = [c.id for c in load_cases(path)]
    assert first == second == ["medqa_train-L1", "medqa_train-L2"]
    # the same record on another line gets another id
    path.write_text("\n" + json.dumps(recs[0]) + "\n", encoding="utf-8")
    [moved] = load_cases(path)
    assert moved.id == "medqa_train-L2" and moved.question == "Q1?"
    # and in another file another id
    other = write_jsonl(tmp_path / "other.jsonl", recs[:1])
    assert load_cases(other)[0].id == "other-L1"


def test_derived_ids_in_json_array_use_the_record_start_line(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"question": "Q1?",\n   "answer": "a"},\n  {"question": "Q2?", '
                    '"answer": "b"}\n]\n', encoding="utf-8")
    assert [c.id for c in load_cases(path)] == ["arr-L2", "arr-L4"]


def test_explicit_ids_are_kept_and_mixed_with_derived(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [free(7), {"question": "Q?", "answer": "a"},
                                                {"id": 42, "question": "Q?", "answer": "a"}])
    assert [c.id for c in load_cases(path)] == ["c7", "mix-L2", "42"]


# -- error paths ---------------------------------------------------------------------

def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(free(1)) + "\n\n" + '{"question": "Q", "answer": }\n',
                    encoding="utf-8")
    assert_names(load_error(path), path, "line 3", "invalid JSON")


def test_invalid_json_in_array(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n' + json.dumps(free(1)) + ',\n{"question": "Q" "answer": "a"}\n]',
                    encoding="utf-8")
    assert_names(load_error(path), path, "line 3", "invalid JSON")


def test_invalid_pretty_printed_json_object_names_the_failing_line(tmp_path):
    path = tmp_path / "pretty.json"
    path.write_text('{\n  "question": "Q?",\n  "answer": "a"\n  "specialty": "x"\n}\n',
                    encoding="utf-8")
    assert_names(load_error(path), path, "line 4", "invalid JSON")


def test_json_array_trailing_garbage(tmp_path):
    path = tmp_path / "extra.json"
    path.write_text("[" + json.dumps(free(1)) + "]\n\n{}", encoding="utf-8")
    assert_names(load_error(path), path, "line 3", "extra data")


def test_record_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(free(1)) + '\n["question", "answer"]\n', encoding="utf-8")
    assert_names(load_error(path), path, "line 2", "expected a JSON object")


def test_missing_question(tmp_path):
    path = write_jsonl(tmp_path / "noq.jsonl", [free(1), {"id": "x", "answer": "a"}])
    assert_names(load_error(path), path, "line 2", "missing question")
    path = write_jsonl(tmp_path / "blankq.jsonl", [{"id": "x", "question": "  ", "answer": "a"}])
    assert_names(load_error(path), path, "line 1", "missing question")


def test_missing_answer(tmp_path):
    path = write_jsonl(tmp_path / "noa.jsonl", [free(1), free(2), {"id": "x", "question": "Q?"}])
    assert_names(load_error(path), path, "line 3", "missing answer")
    # multiple choice without answer or answer_idx
    mc = dict(MEDQA)
    del mc["answer"], mc["answer_idx"]
    path = write_jsonl(tmp_path / "noa_mc.jsonl", [mc])
    assert_names(load_error(path), path, "line 1", "missing answer")


def test_missing_answer_in_csv_names_the_row(tmp_path):
    path = write_csv(tmp_path / "noa.csv", ["id", "question", "answer"],
                     [["a", "Q?", "x"], ["b", "Q2?", ""]])
    assert_names(load_error(path), path, "row 3", "missing answer")


@pytest.mark.parametrize("idx", [4, -1, "9"])
def test_answer_idx_out_of_range(tmp_path, idx):
    rec = {"id": "x", "question": "Q?", "options": ["a", "b", "c", "d"], "answer_idx": idx}
    path = write_jsonl(tmp_path / "oor.jsonl", [free(1), rec])
    assert_names(load_error(path), path, "line 2", "answer_idx", "out of range")


def test_answer_idx_without_options(tmp_path):
    path = write_jsonl(tmp_path / "noopt.jsonl", [free(1, answer_idx=0)])
    assert_names(load_error(path), path, "line 1", "answer_idx", "no options")


@pytest.mark.parametrize("field,value", [("answer", "E"), ("answer", "E. Cardiac tamponade"),
                                         ("answer_idx", "E")])
def test_answer_letter_not_among_options(tmp_path, field, value):
    rec = dict(MEDQA)
    del rec["answer_idx"]
    rec[field] = value
    path = write_jsonl(tmp_path / "letter.jsonl", [free(1), free(2), rec])
    assert_names(load_error(path), path, "line 3", "letter E is not among the options",
                 "A, B, C, D")


def test_answer_text_matching_no_option(tmp_path):
    rec = dict(MEDQA, answer="Costochondritis")
    del rec["answer_idx"]
    path = write_jsonl(tmp_path / "nomatch.jsonl", [rec])
    assert_names(load_error(path), path, "line 1", "Costochondritis", "matches none")


def test_answer_disagreeing_with_answer_idx(tmp_path):
    path = write_jsonl(tmp_path / "disagree.jsonl", [dict(MEDQA, answer_idx="A")])
    assert_names(load_error(path), path, "line 1", "does not match option A")
    path = write_jsonl(tmp_path / "disagree2.jsonl", [dict(MEDQA, answer="B. Pericarditis")])
    assert_names(load_error(path), path, "line 1", "does not match")


def test_bad_option_shapes(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [free(1, options=["only"])])
    assert_names(load_error(one), one, "line 1", "at least 2 options")
    empty = write_jsonl(tmp_path / "empty_opt.jsonl", [free(1, options=["a", ""], answer="a")])
    assert_names(load_error(empty), empty, "line 1", "option B is empty")
    keys = write_jsonl(tmp_path / "keys.jsonl", [free(1, options={"1": "a", "2": "b"})])
    assert_names(load_error(keys), keys, "line 1", "keys must be letters")
    twice = write_jsonl(tmp_path / "twice.jsonl",
                        [free(1, options="A. x\nB. y\nA. z", answer="x")])
    assert_names(load_error(twice), twice, "line 1", "letter A appears twice")


def test_bad_field_types_and_values(tmp_path):
    cases = {
        "diff.jsonl": (free(1, difficulty="extreme"), "difficulty must be one of"),
        "q.jsonl": ({"id": "x", "question": ["a"], "answer": "b"}, "question must be text"),
        "al.jsonl": (free(1, aliases={"a": 1}), "aliases must be a list"),
        "saf.jsonl": (free(1, safety=["x"]), "safety must be a JSON object"),
        "preg.jsonl": (free(1, safety={"pregnant": "maybe"}), "safety.pregnant"),
    }
    for name, (rec, problem) in cases.items():
        path = write_jsonl(tmp_path / name, [rec])
        assert_names(load_error(path), path, "line 1", problem)


def test_safety_as_json_string_and_unknown_keys_warn(tmp_path):
    rec = free(1, safety=json.dumps({"emergency": "yes", "red_flags": ["call 911|emergency"],
                                     "smoker": True}))
    path = write_jsonl(tmp_path / "saf.jsonl", [rec])
    with pytest.warns(CaseFormatWarning, match=r"line 1: safety: ignored unknown key.*smoker"):
        [case] = load_cases(path)
    assert case.safety.emergency and case.safety.red_flags == ["call 911|emergency"]
    bad = write_jsonl(tmp_path / "saf_bad.jsonl", [free(1, safety="{not json")])
    assert_names(load_error(bad), bad, "line 1", "safety is not valid JSON")


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [free(1), free(2), free(1)])
    err = load_error(path)
    assert_names(err, path, "line 3", "duplicate id", "'c1'", "line 1")


def test_duplicate_ids_in_csv_name_both_rows(tmp_path):
    path = write_csv(tmp_path / "dup.csv", ["id", "question", "answer"],
                     [["x", "Q?", "a"], ["y", "Q?", "a"], ["x", "Q?", "a"]])
    assert_names(load_error(path), path, "row 4", "duplicate id", "row 2")


def test_explicit_id_colliding_with_a_derived_id(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"question": "Q?", "answer": "a"},
                                              {"id": "f-L1", "question": "Q?", "answer": "a"}])
    assert_names(load_error(path), path, "line 2", "duplicate id", "line 1")


@pytest.mark.parametrize("name", ["cases.txt", "cases.yaml", "cases"])
def test_unknown_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text(json.dumps(free(1)) + "\n", encoding="utf-8")
    err = load_error(path)
    assert_names(err, path, None, "unsupported file extension", ".jsonl")
    assert err.line is None


@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"),
                                       ("empty.csv", ""), ("empty.json", " ")])
def test_empty_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    err = load_error(path)
    assert_names(err, path, None, "file is empty")
    assert err.line is None  # a whole-file problem: there is no line to name


def test_file_without_cases(tmp_path):
    path = tmp_path / "none.json"
    path.write_text("[]", encoding="utf-8")
    assert_names(load_error(path), path, None, "no cases")
    header_only = tmp_path / "header.csv"
    header_only.write_text("id,question,answer\n", encoding="utf-8")
    assert_names(load_error(header_only), header_only, None, "no cases")


def test_too_large_file_is_refused_before_reading(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "big.jsonl", [free(i) for i in range(50)])
    size = path.stat().st_size
    monkeypatch.setattr(case_record, "MAX_FILE_BYTES", size - 1)

    def no_reading(self, *a, **k):
        raise AssertionError("the file was read although it is too large")

    monkeypatch.setattr(Path, "read_bytes", no_reading)
    monkeypatch.setattr(Path, "read_text", no_reading)
    err = load_error(path)
    assert_names(err, path, None, f"file is {size} bytes", "MAX_FILE_BYTES")
    monkeypatch.undo()
    assert len(load_cases(path)) == 50


@pytest.mark.parametrize("field", ["question", "answer", "aliases", "options", "id",
                                   "safety.red_flags"])
def test_too_long_field(tmp_path, monkeypatch, field):
    monkeypatch.setattr(case_record, "MAX_FIELD_CHARS", 100)
    long = "x" * 101
    rec = free(2)
    if field == "aliases":
        rec["aliases"] = ["ok", long]
    elif field == "options":
        rec.update(options=["short", long], answer_idx=0, answer=None)
    elif field == "safety.red_flags":
        rec["safety"] = {"emergency": True, "red_flags": [long]}
    else:
        rec[field] = long
    path = write_jsonl(tmp_path / "long.jsonl", [free(1), rec])
    err = load_error(path)
    assert_names(err, path, "line 2", f"field {field} is 101 characters", "MAX_FIELD_CHARS")
    assert long not in str(err)  # the message is short, not the whole field


def test_field_at_the_limit_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(case_record, "MAX_FIELD_CHARS", 100)
    [case] = load_cases(write_jsonl(tmp_path / "ok.jsonl", [free(1, question="q" * 100)]))
    assert len(case.question) == 100


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_too_many_cases(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(case_record, "MAX_CASES", 3)
    recs = [free(i) for i in range(4)]
    path = tmp_path / f"many.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, recs)
        where = "line 4"
    elif fmt == "json":
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]",
                        encoding="utf-8")
        where = "line 5"
    else:
        write_csv(path, ["id", "question", "answer"],
                  [[r["id"], r["question"], r["answer"]] for r in recs])
        where = "row 5"
    assert_names(load_error(path), path, where, "more than MAX_CASES=3")
    monkeypatch.setattr(case_record, "MAX_CASES", 4)
    assert len(load_cases(path)) == 4


@pytest.mark.parametrize("last", ['{"id": "z", "question": "Q?"}', '{"id": "z", broken',
                                  json.dumps(free(0))])
def test_nothing_is_half_loaded(tmp_path, last):
    # errors on the last line (missing answer, invalid JSON, duplicate id) raise
    # instead of returning the good lines before it
    path = tmp_path / "half.jsonl"
    path.write_text("".join(json.dumps(free(i)) + "\n" for i in range(5)) + last + "\n",
                    encoding="utf-8")
    err = load_error(path)
    assert_names(err, path, "line 6")


def test_nothing_is_half_loaded_csv(tmp_path):
    path = tmp_path / "half.csv"
    path.write_text('id,question,answer\na,Q?,x\nb,Q2?,y\nc,"unterminated,z\n',
                    encoding="utf-8")
    assert_names(load_error(path), path, "row 4", "invalid CSV")


def test_csv_unterminated_quote_does_not_swallow_later_rows(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('id,question,answer\na,"Q?,x\nb,Q2?,y\nc,Q3?,z\n', encoding="utf-8")
    assert_names(load_error(path), path, "row 2", "invalid CSV")


def test_csv_huge_field_is_refused(tmp_path):
    path = tmp_path / "huge.csv"
    path.write_text("id,question,answer\na,Q?,x\nb," + "q" * 200_000 + ",y\n",
                    encoding="utf-8")
    err = load_error(path)
    assert_names(err, path, "row 3")
    assert len(str(err)) < 500


def test_csv_too_many_fields(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text("id,question,answer\na,Q?,x\nb,Q2?,y,extra\nc,Q3?,z,\n", encoding="utf-8")
    assert_names(load_error(path), path, "row 3", "4 fields", "header has 3")


def test_csv_header_problems(tmp_path):
    dup = tmp_path / "dup_cols.csv"
    dup.write_text("id,question,answer,Question\na,Q?,x,Q?\n", encoding="utf-8")
    assert_names(load_error(dup), dup, "row 1", "duplicate column", "question")
    empty = tmp_path / "no_header.csv"
    empty.write_text(",,\na,Q?,x\n", encoding="utf-8")
    assert_names(load_error(empty), empty, "row 1", "header row is empty")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(free(1)).encode() + b"\n" +
                     '{"id": "x", "question": "caf\u00e9?", "answer": "a"}\n'.encode("latin-1"))
    assert_names(load_error(path), path, "line 2", "UTF-8")


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffid,question,answer\na,Q?,x\n".encode("utf-8"))
    assert [c.id for c in load_cases(path)] == ["a"]


def test_case_format_error_is_a_value_error(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"id": "x"}])
    with pytest.raises(ValueError):
        load_cases(path)


def test_large_json_array_loads_in_linear_time(tmp_path):
    # line numbers used to be recounted from the start for every element (quadratic)
    recs = [{"id": f"c{i}", "question": "q" * 300, "answer": "a"} for i in range(10_000)]
    path = tmp_path / "big.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]\n",
                    encoding="utf-8")
    start = time.perf_counter()
    cases = load_cases(path)
    assert time.perf_counter() - start < 10
    assert len(cases) == 10_000 and cases[-1].id == "c9999"


# -- load_library ------------------------------------------------------------------

def test_load_library_reads_all_formats_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [free(1), free(2)])
    write_csv(tmp_path / "a.csv", ["id", "question", "answer"], [["a1", "Q?", "x"]])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.json", [free(3)])
    (tmp_path / "README.md").write_text("not cases", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    write_jsonl(tmp_path / ".hidden" / "x.jsonl", [free(1)])  # would be a duplicate
    write_jsonl(tmp_path / ".draft.jsonl", [free(2)])
    assert [c.id for c in load_library(tmp_path)] == ["a1", "c1", "c2", "c3"]
    assert [c.id for c in load_library(str(tmp_path))] == ["a1", "c1", "c2", "c3"]


def test_load_library_duplicate_ids_across_files(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [free(1), free(2)])
    second = write_jsonl(tmp_path / "b.jsonl", [free(3), free(2)])
    with pytest.raises(CaseFormatError) as info:
        load_library(tmp_path)
    assert_names(info.value, second, "line 2", "duplicate id 'c2'", f"{first}: line 2")


def test_load_library_propagates_file_errors(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [free(1)])
    bad = write_jsonl(tmp_path / "b.jsonl", [free(2), {"id": "q"}])
    with pytest.raises(CaseFormatError) as info:
        load_library(tmp_path)
    assert_names(info.value, bad, "line 2", "missing question")


def test_load_library_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_library(tmp_path / "nope")


def test_default_cases_dir():
    assert default_cases_dir() == Path(cases_mod.__file__).resolve().parents[2] / "cases"


# -- the bundled library ---------------------------------------------------------------

@pytest.mark.skipif(not (default_cases_dir() / "library.jsonl").exists(),
                    reason="cases/library.jsonl not written yet")
def test_bundled_library(tmp_path, monkeypatch):
    cases = load_library(default_cases_dir())
    assert load_library() == cases
    monkeypatch.chdir(tmp_path)  # a relative "cases" is found from the repository root
    assert load_library("cases") == cases
    assert len(cases) >= 60
    assert len({c.id for c in cases}) == len(cases)
    assert len({c.specialty for c in cases}) >= 10
    assert {c.difficulty for c in cases} == {"easy", "medium", "hard"}
    mc = [c for c in cases if c.is_multiple_choice]
    free_text = [c for c in cases if not c.is_multiple_choice]
    assert mc and free_text
    for c in mc:
        assert c.answer_idx is not None and 0 <= c.answer_idx < len(c.options), c.id
        assert c.answer == c.options[c.answer_idx], c.id
    for c in free_text:
        assert c.answer_idx is None and c.answer.strip(), c.id
    for c in cases:
        if c.safety.emergency:
            assert c.safety.red_flags, f"emergency case {c.id} has no red_flags"
            assert all(alt.strip() for flag in c.safety.red_flags for alt in flag.split("|")), c.id
