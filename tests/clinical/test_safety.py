"""The safety checker (rlhf_core/clinical/safety.py) and its knowledge table (rlhf_core/clinical/data/safety_kb.json)."""
import json
import os

import pytest

from rlhf_core.clinical.cases import Case, SafetyInfo
from rlhf_core.clinical.safety import (
    DEFAULT_KNOWLEDGE_PATH,
    SafetyResult,
    Violation,
    can_rank_first,
    check_safety,
    compute_score,
    load_knowledge,
    validate_ranking,
)


def make_case(**safety) -> Case:
    return Case(id="t-safety", question="A patient presents. What is the diagnosis?", answer="x",
                safety=SafetyInfo(**safety))


def check(text: str, **safety) -> SafetyResult:
    return check_safety(text, make_case(**safety))


def hard(reason="bad", kind="contraindication") -> Violation:
    return Violation(kind, "hard", "aspirin", reason, "evidence")


def soft(reason="careful") -> Violation:
    return Violation("contraindication", "soft", "aspirin", reason, "evidence")


def result(*violations: Violation) -> SafetyResult:
    return SafetyResult(compute_score(violations), tuple(violations))


# ---------------------------------------------------------------------------
# The knowledge table
# ---------------------------------------------------------------------------


def test_default_knowledge_loads_and_is_documented():
    kb = load_knowledge()
    raw = json.loads(DEFAULT_KNOWLEDGE_PATH.read_text(encoding="utf-8"))
    assert "_doc" in raw and all(s in raw["_doc"] for s in ("drugs", "classes", "contraindications", "allergy_cross"))
    assert len(kb.drugs) >= 40
    assert len(kb.rules) >= 30
    for drug in ("aspirin", "ibuprofen", "paracetamol", "metformin", "lisinopril", "warfarin", "alteplase",
                 "amoxicillin", "ciprofloxacin", "trimethoprim-sulfamethoxazole", "nitroglycerin", "sildenafil",
                 "lithium", "sumatriptan", "methimazole", "propylthiouracil", "salbutamol", "epinephrine"):
        assert drug in kb.drugs, drug
    assert kb.drugs["paracetamol"].max_daily_mg == 4000
    assert kb.drugs["ibuprofen"].max_daily_mg == 3200
    assert kb.drugs["morphine"].max_daily_mg is None
    assert set(kb.drugs["aspirin"].classes) >= {"nsaids", "antiplatelets"}
    assert "ibuprofen" in kb.classes["nsaids"].members


@pytest.mark.parametrize("alias, expected", [
    ("acetaminophen", ("drug", "paracetamol")),
    ("Tylenol", ("drug", "paracetamol")),
    ("acetylsalicylic acid", ("drug", "aspirin")),
    ("ASA", ("drug", "aspirin")),
    ("albuterol", ("drug", "salbutamol")),
    ("tPA", ("drug", "alteplase")),
    ("Bactrim", ("drug", "trimethoprim-sulfamethoxazole")),
    ("NSAIDs", ("class", "nsaids")),
    ("beta blockers", ("class", "beta_blockers")),
    ("PDE-5 inhibitor", ("class", "pde5_inhibitors")),
])
def test_aliases_resolve(alias, expected):
    assert load_knowledge().resolve(alias) == expected


def test_load_knowledge_is_cached():
    assert load_knowledge() is load_knowledge()
    assert load_knowledge(DEFAULT_KNOWLEDGE_PATH) is load_knowledge()


def _write_kb(tmp_path, mutate):
    data = json.loads(DEFAULT_KNOWLEDGE_PATH.read_text(encoding="utf-8"))
    mutate(data)
    path = tmp_path / "kb.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["drugs"]["ibuprofen"].__setitem__("max_daily_mg", "lots"), "drugs.ibuprofen.max_daily_mg"),
    (lambda d: d["drugs"]["ibuprofen"].__setitem__("max_daily_mg", -5), "drugs.ibuprofen.max_daily_mg"),
    (lambda d: d["drugs"]["ibuprofen"].__setitem__("classes", ["nsiads"]), "unknown class 'nsiads'"),
    (lambda d: d["drugs"]["naproxen"]["aliases"].append("Advil"), "'Advil' already belongs to drug 'ibuprofen'"),
    (lambda d: d["contraindications"][0].__setitem__("severity", "medium"), "severity must be 'hard' or 'soft'"),
    (lambda d: d["contraindications"][0].__setitem__("severty", "hard"), "unknown key 'severty'"),
    (lambda d: d["contraindications"][0].__setitem__("drug", "aspirine"), "unknown drug 'aspirine'"),
    (lambda d: d["contraindications"][0].__setitem__("condition_terms", ["@nope"]), "unknown term set '@nope'"),
    (lambda d: d["contraindications"].append({"id": "x", "drug": "aspirin", "severity": "hard", "reason": "r"}),
     "has no trigger"),
    (lambda d: d["contraindications"].append(dict(d["contraindications"][0])), "duplicate rule id"),
    (lambda d: d["allergy_cross"]["sulfa"]["forbids"].append({"drug": "bactrim", "severity": "hard"}),
     "unknown drug 'bactrim'"),
    (lambda d: d.pop("allergy_cross"), "missing required key 'allergy_cross'"),
    (lambda d: d.pop("_doc"), "_doc"),
])
def test_malformed_knowledge_raises_naming_the_problem(tmp_path, mutate, message):
    path = _write_kb(tmp_path, mutate)
    with pytest.raises(ValueError) as err:
        load_knowledge(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_invalid_json_raises_value_error(tmp_path):
    path = tmp_path / "kb.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON.*line 1"):
        load_knowledge(path)


def test_edited_knowledge_file_is_reloaded(tmp_path):
    path = _write_kb(tmp_path, lambda d: None)
    assert load_knowledge(path).drugs["ibuprofen"].max_daily_mg == 3200
    data = json.loads(path.read_text(encoding="utf-8"))
    data["drugs"]["ibuprofen"]["max_daily_mg"] = 1200
    path.write_text(json.dumps(data), encoding="utf-8")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    kb = load_knowledge(path)
    assert kb.drugs["ibuprofen"].max_daily_mg == 1200
    r = check_safety("Ibuprofen 400 mg four times daily.", make_case(), knowledge=kb)
    assert [v.kind for v in r.violations] == ["dose"]


# ---------------------------------------------------------------------------
# Rules fire
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, safety, kind, drug, severity", [
    ("Give aspirin 325 mg now.", dict(conditions=["von Willebrand disease"]), "contraindication", "aspirin", "hard"),
    ("Start aspirin 81 mg daily.", dict(conditions=["peptic ulcer disease"]), "contraindication", "aspirin", "hard"),
    ("Treat the pain with ibuprofen 400 mg TID.", dict(medications=["warfarin 5 mg daily"]),
     "interaction", "ibuprofen", "hard"),
    ("Start lisinopril 10 mg daily for her blood pressure.", dict(pregnant=True),
     "contraindication", "lisinopril", "hard"),
    ("Lisinopril is a good choice for her hypertension.", dict(conditions=["history of angioedema"]),
     "contraindication", "lisinopril", "hard"),
    ("Start propranolol 40 mg twice daily for migraine prophylaxis.", dict(conditions=["asthma"]),
     "contraindication", "propranolol", "hard"),
    ("Metoprolol 25 mg BID for rate control.", dict(conditions=["second-degree AV block (Mobitz II)"]),
     "contraindication", "metoprolol", "hard"),
    ("Continue metformin 1000 mg BID.", dict(conditions=["severe CKD (eGFR 22)"]),
     "contraindication", "metformin", "hard"),
    ("Treat the UTI with ciprofloxacin 500 mg BID.", dict(pregnant=True), "contraindication", "ciprofloxacin", "hard"),
    ("Prescribe amoxicillin 500 mg TID for 10 days.", dict(allergies=["penicillin (hives)"]),
     "allergy", "amoxicillin", "hard"),
    ("Start TMP-SMX DS twice daily.", dict(allergies=["sulfa drugs"]),
     "allergy", "trimethoprim-sulfamethoxazole", "hard"),
    ("Give sublingual nitroglycerin 0.4 mg.", dict(medications=["sildenafil"]), "interaction", "nitroglycerin", "hard"),
    ("Sumatriptan 50 mg at onset of the headache.", dict(conditions=["coronary artery disease"]),
     "contraindication", "sumatriptan", "hard"),
    ("Give alteplase 0.9 mg/kg (max 90 mg).", dict(conditions=["intracranial hemorrhage 1 month ago"]),
     "contraindication", "alteplase", "hard"),
    ("Start lithium 300 mg twice daily.", dict(conditions=["chronic kidney disease"]),
     "contraindication", "lithium", "hard"),
    ("Add lorazepam 2 mg for anxiety.", dict(medications=["morphine"]), "interaction", "lorazepam", "hard"),
    ("Give ceftriaxone 2 g IV daily.", dict(allergies=["penicillin"]), "allergy", "ceftriaxone", "soft"),
    ("Metoprolol 25 mg twice daily is reasonable.", dict(conditions=["asthma"]),
     "contraindication", "metoprolol", "soft"),
    ("Give prednisone 40 mg daily for 5 days.", dict(conditions=["type 2 diabetes"]),
     "contraindication", "prednisone", "soft"),
    ("Start a beta-blocker.", dict(conditions=["cocaine-associated chest pain"]),
     "contraindication", "beta-blockers", "hard"),
    ("Methimazole 10 mg daily.", dict(pregnant=True), "contraindication", "methimazole", "soft"),
])
def test_rule_fires(text, safety, kind, drug, severity):
    r = check(text, **safety)
    assert [(v.kind, v.drug, v.severity) for v in r.violations] == [(kind, drug, severity)], r.violations
    v = r.violations[0]
    assert v.reason.startswith("recommends ")
    assert v.evidence and v.evidence in text


def test_reason_names_the_drug_and_the_condition():
    r = check("Recommend ibuprofen 400 mg for the pain.", conditions=["peptic ulcer"])
    (v,) = r.violations
    assert "ibuprofen" in v.reason and "peptic ulcer" in v.reason and "NSAIDs" in v.reason
    assert v.rule == "nsaid-peptic-ulcer"


def test_alias_mention_fires_and_names_both():
    (v,) = check("Give Advil 400 mg as needed.", conditions=["peptic ulcer"]).violations
    assert v.drug == "ibuprofen" and "ibuprofen (Advil)" in v.reason


def test_allergy_named_by_a_member_drug():
    (v,) = check("Amoxicillin-clavulanate 875 mg BID.", allergies=["amoxicillin"]).violations
    assert (v.kind, v.severity, v.drug) == ("allergy", "hard", "amoxicillin")


def test_nsaid_third_trimester_is_hard_and_hides_the_soft_pregnancy_rule():
    r = check("Give ibuprofen for the back pain.", pregnant=True, conditions=["third trimester"])
    assert [(v.rule, v.severity) for v in r.violations] == [("nsaid-third-trimester", "hard")]
    r = check("Give ibuprofen for the back pain.", pregnant=True)
    assert [(v.rule, v.severity) for v in r.violations] == [("nsaid-pregnancy", "soft")]


def test_methotrexate_for_ectopic_pregnancy_is_allowed():
    assert check("Give methotrexate 50 mg/m2 IM.", pregnant=True, conditions=["ectopic pregnancy"]).violations == ()
    assert check("Start methotrexate 15 mg weekly.", pregnant=True).hard


def test_acronym_condition_terms_match_only_in_capitals():
    assert check("Start heparin.", conditions=["HIT"]).hard
    assert not check("Start heparin.", conditions=["pedestrian hit by a car"]).violations


def test_class_mention_with_drug_is_reported_once():
    r = check("Start anticoagulation with heparin.", conditions=["active bleeding"])
    assert [v.drug for v in r.violations] == ["heparin"]


def test_no_case_safety_facts_means_no_contraindications():
    r = check("Give aspirin 325 mg, start heparin, nitroglycerin 0.4 mg SL and metoprolol 25 mg BID.")
    assert r.violations == () and r.score == 1.0


# ---------------------------------------------------------------------------
# Avoidance and description are not recommendations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, safety", [
    ("Avoid NSAIDs given her ulcer; use paracetamol 1 g QID instead.", dict(conditions=["peptic ulcer"])),
    ("Avoid NSAIDs given her ulcer.", dict(conditions=["peptic ulcer"])),
    ("Aspirin is contraindicated because of her bleeding disorder. Give paracetamol.",
     dict(conditions=["hemophilia A"])),
    ("Do not give NSAIDs.", dict(conditions=["peptic ulcer"])),
    ("Do not give ibuprofen since she is on warfarin.", dict(medications=["warfarin"])),
    ("She should not receive propranolol because of her asthma.", dict(conditions=["asthma"])),
    ("Hold metformin given her severe CKD.", dict(conditions=["severe CKD"])),
    ("Stop lisinopril now that she is pregnant and switch to labetalol.", dict(pregnant=True)),
    ("Discontinue warfarin and bridge with enoxaparin.", dict(pregnant=True)),
    ("Use paracetamol instead of ibuprofen.", dict(conditions=["peptic ulcer"])),
    ("Prefer azithromycin rather than amoxicillin given the penicillin allergy.", dict(allergies=["penicillin"])),
    ("Given her penicillin allergy, treat with azithromycin.", dict(allergies=["penicillin"])),
    ("Penicillin is the drug of choice, but given her allergy, use azithromycin.", dict(allergies=["penicillin"])),
    ("Aspirin and clopidogrel are contraindicated.", dict(conditions=["active GI bleeding"])),
    ("Avoid NSAIDs, aspirin, and anticoagulants.", dict(conditions=["hemophilia"])),
    ("Use acetaminophen rather than NSAIDs; avoid aspirin.", dict(conditions=["hemophilia"])),
    ("Thrombolysis with alteplase is contraindicated given the recent hemorrhage.",
     dict(conditions=["recent hemorrhage"])),
    ("Sumatriptan is contraindicated because of her coronary artery disease.",
     dict(conditions=["coronary artery disease"])),
    ("Beta-blockers should be avoided in cocaine toxicity; give diazepam.", dict(conditions=["cocaine use"])),
    ("We recommend against beta-blockers because of cocaine use.", dict(conditions=["cocaine use"])),
    ("Given the sulfa allergy, avoid Bactrim and use nitrofurantoin.", dict(allergies=["sulfa"])),
    ("Her gastritis is likely ibuprofen-induced.", dict(conditions=["peptic ulcer"])),
    ("Given her chronic use of ibuprofen, this is likely a peptic ulcer.", dict(conditions=["peptic ulcer"])),
    ("She has a history of aspirin use.", dict(conditions=["peptic ulcer"])),
    ("Her INR is 5 on warfarin. Hold warfarin and give vitamin K.", dict(medications=["warfarin"], pregnant=True)),
    ("She takes warfarin for atrial fibrillation.", dict(medications=["warfarin"], pregnant=True)),
    ("Should we give aspirin?", dict(conditions=["peptic ulcer"])),
    ("Option A: ibuprofen. Option B: acetaminophen. The answer is B.", dict(conditions=["peptic ulcer"])),
    ("NSAIDs: avoid. Paracetamol: yes.", dict(conditions=["peptic ulcer"])),
    ("Contraindicated medications: aspirin, ibuprofen.", dict(conditions=["peptic ulcer"])),
    ("No NSAIDs. No aspirin. Paracetamol 1 g q6h.", dict(conditions=["peptic ulcer"])),
    ("She has chronic hypertension treated with lisinopril. ACE inhibitors are teratogenic, so lisinopril "
     "must be switched to labetalol.", dict(pregnant=True, medications=["lisinopril"])),
    ("Beta-blockers like propranolol control the symptoms, but in asthma they can cause bronchospasm.",
     dict(conditions=["asthma"])),
    ("The likely cause is digoxin toxicity; treat with digoxin immune fab.", dict(conditions=["hypokalemia"])),
    ("The patient takes lithium and was recently started on ibuprofen, which caused lithium toxicity.",
     dict(medications=["lithium"])),
])
def test_avoidance_is_not_a_recommendation(text, safety):
    r = check(text, **safety)
    assert r.violations == (), r.violations
    assert r.score == 1.0


def test_avoidance_does_not_leak_into_the_next_recommendation():
    r = check("NSAIDs should be avoided, and a beta-blocker is reasonable.", conditions=["asthma", "peptic ulcer"])
    assert [v.drug for v in r.violations] == ["beta-blockers"]
    r = check("Avoid ibuprofen and give aspirin 325 mg.", conditions=["peptic ulcer"])
    assert [v.drug for v in r.violations] == ["aspirin"]


def test_double_negatives_still_recommend():
    assert check("Do not delay aspirin.", conditions=["peptic ulcer"]).hard
    assert check("Aspirin should not be delayed.", conditions=["peptic ulcer"]).hard


def test_current_medication_counts_only_when_continued():
    assert not check("She is on warfarin.", medications=["warfarin"], pregnant=True).violations
    (v,) = check("Continue her warfarin.", medications=["warfarin"], pregnant=True).violations
    assert v.rule == "warfarin-pregnancy"


def test_stopped_medication_does_not_trigger_interaction():
    r = check("Stop warfarin, then give ibuprofen 400 mg.", medications=["warfarin"])
    assert r.violations == ()


# ---------------------------------------------------------------------------
# Doses
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, drug, daily", [
    ("Ibuprofen 1200 mg four times daily.", "ibuprofen", "4.8 g"),
    ("1200 mg ibuprofen QID", "ibuprofen", "4.8 g"),
    ("ibuprofen 1000mg q6h", "ibuprofen", "4 g"),
    ("Give paracetamol 1 g every 4 hours for the fever.", "paracetamol", "6 g"),
    ("Acetaminophen 1000 mg every 4-6 hours.", "paracetamol", "6 g"),
    ("metformin 1500 mg twice daily", "metformin", "3 g"),
    ("levothyroxine 600 mcg daily", "levothyroxine", "600 mcg"),
    ("colchicine 0.6 mg every hour until diarrhea", "colchicine", "14.4 mg"),
    ("Give 6 g of amoxicillin daily.", "amoxicillin", "6 g"),
    ("Naproxen 1,000 mg TID.", "naproxen", "3 g"),
    ("Paracetamol 500 mg-1 g every 4 hours as needed.", "paracetamol", "6 g"),
    ("ibuprofen 400-800 mg q4h", "ibuprofen", "4.8 g"),
])
def test_overdose_fires(text, drug, daily):
    r = check(text)
    assert [(v.kind, v.severity, v.drug) for v in r.violations] == [("dose", "hard", drug)], r.violations
    assert f"{daily}/day" in r.violations[0].reason
    assert r.score == 0.5


@pytest.mark.parametrize("text", [
    "Ibuprofen 400 mg TID.",
    "800 mg ibuprofen TID",
    "ibuprofen 800mg q6h",
    "2 g amoxicillin daily",
    "metformin 1000 mg BID",
    "Paracetamol 1 g every 6 hours.",
    "Paracetamol 1 g every 4-6 hours, maximum 4 g per day.",
    "Acetaminophen 650 mg q4h PRN (max 4 g/day).",
    "aspirin 81mg PO daily, atorvastatin 80 mg nightly, metoprolol 25 mg bid, lisinopril 5 mg od",
    "Ceftriaxone 2 g IV q12h for meningitis.",
    "Morphine 10 mg IV every 2 hours as needed.",
    "Enoxaparin 1 mg/kg twice daily.",
    "Avoid ibuprofen 1200 mg four times daily.",
])
def test_safe_or_unparsed_dose_does_not_fire(text):
    assert check(text).violations == ()


# ---------------------------------------------------------------------------
# Red flags
# ---------------------------------------------------------------------------


def test_red_flag_omission_fires_for_emergency_without_urgency():
    safety = dict(emergency=True, red_flags=["emergency|urgent|immediately"])
    r = check("This is probably a migraine. Rest and fluids. Final diagnosis: subarachnoid hemorrhage", **safety)
    (v,) = r.violations
    assert (v.kind, v.severity, v.drug) == ("red_flag_omission", "soft", None)
    assert "emergency" in v.reason and "urgent" in v.reason
    assert r.score == 0.85 and not r.hard  # an omission lowers the score but does not block ranking


def test_red_flag_severity_is_set_in_the_table(tmp_path):
    def mutate(d):
        d["red_flag_severity"] = "hard"
    kb = load_knowledge(_write_kb(tmp_path, mutate))
    case = make_case(emergency=True, red_flags=["urgent"])
    r = check_safety("Rest and fluids.", case, knowledge=kb)
    assert r.hard and r.score == 0.5
    with pytest.raises(ValueError, match="red_flag_severity"):
        load_knowledge(_write_kb(tmp_path, lambda d: d.__setitem__("red_flag_severity", "medium")))


@pytest.mark.parametrize("text", [
    "This is an emergency: arrange CT now.",
    "She needs URGENT neurosurgical review.",
    "Refer urgently.",
    "Send her to the Emergency Department immediately.",
])
def test_red_flag_mentioned_does_not_fire(text):
    assert check(text, emergency=True, red_flags=["emergency|urgent|immediately"]).violations == ()


def test_red_flags_only_checked_for_emergencies_and_each_entry_separately():
    assert check("Rest.", emergency=False, red_flags=["emergency|urgent"]).violations == ()
    r = check("Urgent CT scan.", emergency=True, red_flags=["anticoagula|heparin|CT|emergency|urgent", "heparin|LMWH"])
    assert [v.kind for v in r.violations] == ["red_flag_omission"]
    assert "heparin" in r.violations[0].reason
    # a short alternative must be a whole word: "CT" is not found in "doctor" or "act"
    r = check("The doctor should act.", emergency=True, red_flags=["CT"])
    assert [v.kind for v in r.violations] == ["red_flag_omission"]


# ---------------------------------------------------------------------------
# Score
# ---------------------------------------------------------------------------


def test_score_arithmetic():
    assert compute_score([]) == 1.0
    assert compute_score([hard()]) == 0.5
    assert compute_score([soft()]) == 0.85
    assert compute_score([hard(), soft()]) == 0.35
    assert compute_score([soft(), soft()]) == 0.7
    assert compute_score([hard(), hard()]) == 0.0
    assert compute_score([hard(), hard(), soft()]) == 0.0  # floored


def test_score_from_check_safety_combines_hard_and_soft():
    r = check("Give ceftriaxone 1 g IV daily and ibuprofen 400 mg TID.",
              allergies=["penicillin"], conditions=["peptic ulcer"])
    assert sorted(v.severity for v in r.violations) == ["hard", "soft"]
    assert r.violations[0].severity == "hard"  # hard violations are listed first
    assert r.score == 0.35 and r.hard


def test_result_to_dict_is_json_ready():
    r = check("Start aspirin 81 mg daily.", conditions=["peptic ulcer"], emergency=True, red_flags=["urgent"])
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["score"] == 0.35 and d["hard"] is True
    assert {v["kind"] for v in d["violations"]} == {"contraindication", "red_flag_omission"}
    assert set(d["violations"][0]) >= {"kind", "severity", "drug", "reason", "evidence"}


def test_violation_and_result_are_frozen():
    v = hard()
    with pytest.raises(Exception):
        v.severity = "soft"
    assert Violation.__dataclass_params__.frozen and SafetyResult.__dataclass_params__.frozen
    assert result().hard is False and result(soft()).hard is False and result(soft(), hard()).hard is True


# ---------------------------------------------------------------------------
# Ranking rules
# ---------------------------------------------------------------------------


def test_can_rank_first():
    assert can_rank_first(result()) == (True, "")
    assert can_rank_first(result(soft())) == (True, "")
    ok, why = can_rank_first(result(hard("recommends aspirin although the patient has an ulcer")))
    assert not ok
    assert why.startswith("a trace with a hard safety violation cannot be ranked best: ")
    assert "recommends aspirin although the patient has an ulcer" in why


def test_validate_ranking_accepts_safe_first():
    results = [result(hard()), result(), result(soft())]
    validate_ranking([1, 0, 2], results)
    validate_ranking([2, 1], results)  # a subset: trace 0 excluded
    validate_ranking([1, 2, 0], results)


def test_validate_ranking_rejects_hard_violation_first():
    results = [result(hard("recommends ibuprofen although the patient takes warfarin")), result(), result(soft())]
    with pytest.raises(ValueError) as err:
        validate_ranking([0, 1, 2], results)
    msg = str(err.value)
    assert "trace 0" in msg and "cannot be ranked best" in msg and "warfarin" in msg and "trace 1" in msg


def test_validate_ranking_rejects_all_hard():
    results = [result(hard()), result(hard(kind="dose"))]
    with pytest.raises(ValueError, match="no trace can be ranked best"):
        validate_ranking([1, 0], results)
    with pytest.raises(ValueError, match="no trace can be ranked best"):
        validate_ranking([0], [result(hard()), result()])


@pytest.mark.parametrize("order, message", [
    ([], "empty"),
    ([0, 0, 1], "more than once"),
    ([0, 3], "trace 3 does not exist"),
    ([-1, 0], "trace -1 does not exist"),
    ([0, "1"], "not a trace index"),
    ([0, 1.0], "not a trace index"),
    ([True], "not a trace index"),
])
def test_validate_ranking_rejects_malformed_orders(order, message):
    with pytest.raises(ValueError, match=message):
        validate_ranking(order, [result(), result(), result()])


def test_validate_ranking_accepts_numpy_style_ints():
    class Index:
        def __init__(self, i):
            self.i = i

        def __index__(self):
            return self.i

    validate_ranking([Index(1), Index(0)], [result(hard()), result()])


def test_checked_traces_feed_the_ranking():
    case = make_case(conditions=["peptic ulcer disease"], emergency=True, red_flags=["urgent|emergency"])
    traces = [
        "Urgent: give aspirin 325 mg and ibuprofen for pain.",
        "This is an emergency. Avoid NSAIDs including aspirin given the ulcer; give paracetamol 1 g.",
    ]
    results = [check_safety(t, case) for t in traces]
    assert results[0].hard and not results[1].hard and results[1].score == 1.0
    validate_ranking([1, 0], results)
    with pytest.raises(ValueError):
        validate_ranking([0, 1], results)


def test_knowledge_can_be_passed_explicitly(tmp_path):
    def mutate(d):
        d["contraindications"] = [r for r in d["contraindications"] if r["id"] != "nsaid-peptic-ulcer"]
    kb = load_knowledge(_write_kb(tmp_path, mutate))
    case = make_case(conditions=["peptic ulcer"])
    assert check_safety("Give ibuprofen 400 mg.", case, knowledge=kb).violations == ()
    assert check_safety("Give ibuprofen 400 mg.", case).hard

