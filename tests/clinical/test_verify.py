"""The verifier: a hand-written table of (case, trace, true verdict, true code).

The table records the TRUE verdict a careful clinician would give. Precision of
acceptance must be perfect (every true reject is asserted row by row, with its
reason code); recall is measured honestly over the table and must be >= 0.95.
Rows marked "# known miss" are true accepts the verifier is too conservative
to accept; they count against recall.
"""
from __future__ import annotations

import pytest

from rlhf_core.clinical.cases import Case
from rlhf_core.clinical.verify import (
    CODES, Verdict, check_trace, earlier_disagreement, extract_conclusion, normalise_diagnosis,
)

Q = "What is the most likely diagnosis?"

APPY = Case(id="appy", question=Q, answer="Acute appendicitis", aliases=["appendicitis"],
            distractors=["ovarian torsion", "ectopic pregnancy", "mesenteric adenitis", "acute pancreatitis"])
MI = Case(id="mi", question=Q, answer="Acute myocardial infarction", aliases=["MI", "heart attack", "STEMI"],
          distractors=["pulmonary embolism", "aortic dissection", "pericarditis", "unstable angina"])
PE = Case(id="pe", question=Q, answer="Pulmonary embolism", aliases=["PE"],
          distractors=["pneumonia", "pneumothorax", "myocardial infarction"])
DKA = Case(id="dka", question=Q, answer="Diabetic ketoacidosis", aliases=["DKA"],
           distractors=["hyperosmolar hyperglycaemic state", "alcoholic ketoacidosis", "gastroenteritis"])
PREEC = Case(id="preec", question=Q, answer="Pre-eclampsia",
             distractors=["eclampsia", "gestational hypertension", "HELLP syndrome"])
ECL = Case(id="ecl", question=Q, answer="Eclampsia", distractors=["pre-eclampsia", "epilepsy"])
GRAVES = Case(id="graves", question=Q, answer="Graves disease", aliases=["Graves' disease", "Basedow disease"],
              distractors=["toxic multinodular goitre", "subacute thyroiditis", "hypothyroidism"])
HYPO = Case(id="hypo", question=Q, answer="Primary hypothyroidism", aliases=["hypothyroidism"],
            distractors=["hyperthyroidism", "depression"])
IDA = Case(id="ida", question=Q, answer="Iron deficiency anaemia", aliases=["IDA"],
           distractors=["anaemia of chronic disease", "beta thalassaemia trait", "vitamin B12 deficiency"])
T1DM = Case(id="t1dm", question=Q, answer="Type 1 diabetes mellitus", aliases=["T1DM", "type 1 diabetes"],
            distractors=["type 2 diabetes mellitus", "diabetes insipidus"])
RVI = Case(id="rvi", question=Q, answer="Right ventricular infarction", aliases=["RV infarction"],
           distractors=["cardiac tamponade", "left ventricular failure"])
RHF = Case(id="rhf", question=Q, answer="Right-sided heart failure", aliases=["right heart failure"],
           distractors=["left-sided heart failure", "constrictive pericarditis"])
PNEU = Case(id="pneu", question=Q, answer="Pneumonia", distractors=["pulmonary embolism", "lung cancer"])
HEP = Case(id="hep", question=Q, answer="Viral hepatitis",
           distractors=["autoimmune hepatitis", "alcoholic hepatitis", "gallstones"])
UC = Case(id="uc", question=Q, answer="Ulcerative colitis", aliases=["UC"],
          distractors=["Crohn's disease", "infectious colitis"])
CROHN = Case(id="crohn", question=Q, answer="Crohn's disease", distractors=["ulcerative colitis", "coeliac disease"])
HFMD = Case(id="hfmd", question=Q, answer="Hand, foot and mouth disease", aliases=["HFMD"],
            distractors=["herpangina", "chickenpox"])
SJS = Case(id="sjs", question=Q, answer="Stevens-Johnson syndrome", aliases=["SJS"],
           distractors=["toxic epidermal necrolysis", "erythema multiforme"])
OES = Case(id="oes", question=Q, answer="Oesophageal carcinoma", aliases=["oesophageal cancer"],
           distractors=["achalasia", "gastric carcinoma"])
HEAT = Case(id="heat", question=Q, answer="Exertional heat stroke", aliases=["heat stroke"],
            distractors=["heat exhaustion", "sepsis", "neuroleptic malignant syndrome"])
MC = Case(id="mc", question=Q, answer="Acute appendicitis",
          options=["Ovarian torsion", "Ectopic pregnancy", "Acute appendicitis", "Mesenteric adenitis", "Renal colic"],
          answer_idx=2)
# The right option's text starts with a letter and a dot: "C. difficile colitis" is option D.
MC2 = Case(id="mc2", question=Q, answer="C. difficile colitis", aliases=["pseudomembranous colitis"],
           options=["Ischaemic colitis", "Crohn disease", "Ulcerative colitis", "C. difficile colitis", "Diverticulitis"],
           answer_idx=3)

REASONING = "The patient has the findings described. Let me weigh the differential step by step.\n\n"
R = ("The patient collapsed during a marathon with a core temperature of 41.2 C and confusion, which points "
     "to a heat illness rather than infection.\n")

# (case, trace, truly accepted?, true code)
TABLE: list[tuple[Case, str, bool, str]] = [
    # --- markdown / format variants of the Final diagnosis line
    (APPY, REASONING + "Final diagnosis: Acute appendicitis", True, "accepted"),
    (APPY, "**Final diagnosis:** Acute appendicitis", True, "accepted"),
    (APPY, "**Final Diagnosis**: acute appendicitis.", True, "accepted"),
    (APPY, "Final diagnosis - Acute appendicitis", True, "accepted"),
    (APPY, "## Final diagnosis: Acute appendicitis", True, "accepted"),
    (APPY, "- Final diagnosis: *Acute appendicitis*.", True, "accepted"),
    (APPY, 'Final diagnosis: "Acute appendicitis"', True, "accepted"),
    (APPY, "FINAL DIAGNOSIS: ACUTE APPENDICITIS", True, "accepted"),
    (APPY, REASONING + "### Final diagnosis\n\nAcute appendicitis\n", True, "accepted"),
    (APPY, "Final diagnosis:\n**Acute appendicitis**", True, "accepted"),
    (APPY, "> **Final diagnosis:** _Acute appendicitis_", True, "accepted"),
    (APPY, "Final diagnosis: Acute appendicitis. Surgical consult is needed.", True, "accepted"),
    (APPY, "Final answer: Acute appendicitis", True, "accepted"),
    (APPY, "Diagnosis: acute appendicitis", True, "accepted"),
    (APPY, "Final diagnosis: Acute appendicitis\n\nNote: if the pain worsens, consider ovarian torsion.", True, "accepted"),
    (MI, "Final diagnosis\uff1aAcute\u00a0myocardial infarction", True, "accepted"),  # fullwidth colon, NBSP
    (MI, "Final diagnosis \u2014 acute myocardial infarction", True, "accepted"),  # em dash
    (APPY, "Final diagnosis: <diagnosis>", False, "no_conclusion"),  # echoed template
    # --- qualifiers, fillers, explanations
    (APPY, "Final diagnosis: Appendicitis, acute", True, "accepted"),
    (APPY, "Final diagnosis: appendicitis", True, "accepted"),
    (APPY, "Final diagnosis: Most likely acute appendicitis", True, "accepted"),
    (APPY, "Final diagnosis: Probable acute appendicitis", True, "accepted"),
    (APPY, "Final diagnosis: acute appendicitis (most likely)", True, "accepted"),
    (APPY, "Final diagnosis: Acute appendicitis, given the migratory RLQ pain and fever.", True, "accepted"),
    (APPY, "Final diagnosis: Perforated appendicitis", False, "wrong_diagnosis"),
    (APPY, "Final diagnosis: Acute appendicitis (perforated)", False, "wrong_diagnosis"),
    (APPY, "Final diagnosis: Chronic appendicitis", False, "wrong_diagnosis"),
    (APPY, "Final diagnosis: ?appendicitis", False, "no_conclusion"),
    # --- distractors, several diagnoses
    (APPY, "Final diagnosis: Ovarian torsion", False, "distractor"),
    (APPY, "Final diagnosis: Acute appendicitis or ovarian torsion", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis: Acute appendicitis vs. mesenteric adenitis", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis: possible appendicitis or ectopic pregnancy", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis: Acute appendicitis/ovarian torsion", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis: either appendicitis or mesenteric adenitis", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis: differential includes appendicitis and ovarian torsion", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis: Appendicitis and/or ectopic pregnancy", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis: Acute appendicitis, ectopic pregnancy", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis: Acute appendicitis (vs ovarian torsion)", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis:\n1. Acute appendicitis\n2. Ovarian torsion", False, "multiple_diagnoses"),
    # --- last line wins; mentions in the reasoning do not count
    (APPY, "Final diagnosis: Ovarian torsion\nWait, the pain migrated from the umbilicus; reconsider.\n"
           "Final diagnosis: Acute appendicitis", True, "accepted"),
    (APPY, "Final diagnosis: Acute appendicitis\nOn reflection the ultrasound shows a twisted ovary.\n"
           "Final diagnosis: Ovarian torsion", False, "distractor"),
    (APPY, "Final diagnosis: Acute appendicitis\nFinal diagnosis: Mesenteric adenitis", False, "distractor"),
    (APPY, "Appendicitis is classically periumbilical pain moving to the RLQ, but the beta-hCG is positive.\n"
           "Final diagnosis: Ectopic pregnancy", False, "distractor"),
    (APPY, "Acute appendicitis fits the RLQ pain well. However, the diagnosis needs imaging.", False, "no_conclusion"),
    (APPY, "Considering RLQ pain, fever and leukocytosis, appendicitis and torsion both remain possible; "
           "imaging is required.", False, "no_conclusion"),
    (APPY, "Differential diagnosis: acute appendicitis, ovarian torsion, ectopic pregnancy.\n"
           "Further imaging is needed.", False, "no_conclusion"),
    # --- what follows the conclusion: hedges on the same line, take-backs, later conclusions
    (APPY, "Final diagnosis: Acute appendicitis. Ovarian torsion is also possible.", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis: Acute appendicitis, though ovarian torsion cannot be excluded", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis: Acute appendicitis (but consider torsion)", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis: acute appendicitis cannot be excluded", False, "no_conclusion"),
    (APPY, "Final diagnosis: acute appendicitis\nActually, no - this is ovarian torsion.", False, "multiple_diagnoses"),
    (APPY, "Final diagnosis: acute appendicitis\n\nIn summary, the patient most likely has ovarian torsion.",
     False, "multiple_diagnoses"),
    (APPY, "The most likely diagnosis is acute appendicitis. However, the positive pregnancy test suggests "
           "ectopic pregnancy.", False, "multiple_diagnoses"),
    (APPY, "The most likely diagnosis is acute appendicitis. Ectopic pregnancy is excluded by the negative hCG.",
     True, "accepted"),
    (APPY, "I don't think the diagnosis is appendicitis.", False, "no_conclusion"),
    (APPY, "Final diagnosis: It is unlikely that the diagnosis is appendicitis", False, "negated"),
    (APPY, "Final diagnosis: Acute appendicitis which is unlikely", False, "negated"),
    (APPY, "Final diagnosis: Ovarian torsion is likely, not appendicitis", False, "negated"),
    (APPY, "Final diagnosis: Acute appendicitis, not perforated", True, "accepted"),
    (APPY, "**Final diagnosis (most likely):** Acute appendicitis", True, "accepted"),
    (APPY, "Final diagnosis: Acute appendicitis (K35.80)", True, "accepted"),
    (APPY, "Final diagnosis: Acute appendicitis (AI)", False, "wrong_diagnosis"),
    (APPY, "**Step 1: Key findings**\n- 22M, periumbilical pain migrating to the RLQ\n- Fever 38.2 C, WBC 14\n\n"
           "**Step 2: Differential**\n1. Acute appendicitis - classic migration of pain\n"
           "2. Mesenteric adenitis - less likely at this age\n3. Ovarian torsion - not applicable, male\n\n"
           "**Final diagnosis:** Acute appendicitis", True, "accepted"),
    # --- empty
    (APPY, "", False, "empty"),
    (APPY, "   \n  ", False, "empty"),
    # --- concluding sentence fallback
    (APPY, REASONING + "Therefore, the most likely diagnosis is acute appendicitis.", True, "accepted"),
    (APPY, "Putting it together, this is most consistent with acute appendicitis.", True, "accepted"),
    (APPY, "Acute appendicitis is the most likely diagnosis given the migratory pain.", True, "accepted"),
    (APPY, "The patient most likely has acute appendicitis.", True, "accepted"),
    (APPY, "These findings are consistent with a diagnosis of acute appendicitis.", True, "accepted"),
    (APPY, "I conclude that this patient has acute appendicitis.", True, "accepted"),
    (APPY, "At first glance the most likely diagnosis is acute appendicitis. But the positive pregnancy test "
           "changes things: the most likely diagnosis is ectopic pregnancy.", False, "distractor"),
    (APPY, "If the diagnosis is appendicitis, we would expect a raised white count. The white count is normal.",
     False, "no_conclusion"),
    # --- negations
    (APPY, "Final diagnosis: not appendicitis", False, "negated"),
    (APPY, "Final diagnosis: Appendicitis ruled out; mesenteric adenitis", False, "negated"),
    (APPY, "Final diagnosis: Unlikely appendicitis", False, "negated"),
    (APPY, "Final diagnosis: Appendicitis is unlikely", False, "negated"),
    (APPY, "Final diagnosis: No evidence of appendicitis", False, "negated"),
    (APPY, "Final diagnosis: Mesenteric adenitis rather than appendicitis", False, "negated"),
    (APPY, "Final diagnosis: Excluded appendicitis", False, "negated"),
    (APPY, "Final diagnosis: Acute appendicitis excluded", False, "negated"),
    (APPY, "Final diagnosis: RLQ pain without appendicitis", False, "negated"),
    (APPY, "Final diagnosis: Acute appendicitis - ruled out", False, "negated"),
    (APPY, "Final diagnosis: Acute appendicitis rather than ovarian torsion", True, "accepted"),
    (APPY, "Final diagnosis: Acute appendicitis (not ovarian torsion)", True, "accepted"),
    # --- MI: aliases, abbreviations, brackets
    (MI, "Final diagnosis: MI", True, "accepted"),
    (MI, "Final diagnosis: Acute MI", True, "accepted"),
    (MI, "Final diagnosis: mi", True, "accepted"),
    (MI, "Final diagnosis: Heart attack", True, "accepted"),
    (MI, "Final diagnosis: STEMI", True, "accepted"),
    (MI, "Final diagnosis: Acute myocardial infarction (STEMI)", True, "accepted"),
    (MI, "Final diagnosis: Acute myocardial infarction (AMI)", True, "accepted"),
    (MI, "Final diagnosis: Heart attack (MI)", True, "accepted"),
    (MI, "Final diagnosis: Myocardial infarction", True, "accepted"),
    (MI, "The ECG shows ST elevation in II, III and aVF. The diagnosis is acute inferior MI.", True, "accepted"),  # known miss
    (MI, "Final diagnosis: Acute myocardial infarction (pulmonary embolism)", False, "multiple_diagnoses"),
    (MI, "Final diagnosis: Acute MI (type 2)", False, "wrong_diagnosis"),
    (MI, "Final diagnosis: NSTEMI", False, "wrong_diagnosis"),
    (MI, "Final diagnosis: Non-ST-elevation myocardial infarction", False, "wrong_diagnosis"),
    (MI, "Final diagnosis: Old myocardial infarction", False, "wrong_diagnosis"),
    (MI, "Final diagnosis: Myocardial ischaemia", False, "wrong_diagnosis"),
    (MI, "Final diagnosis: Acute coronary syndrome", False, "wrong_diagnosis"),
    (MI, "Final diagnosis: Pulmonary embolism", False, "distractor"),
    (MI, "Final diagnosis: Unstable angina", False, "distractor"),
    (MI, "Final diagnosis: not MI", False, "negated"),
    (MI, "Final diagnosis: MI unlikely, aortic dissection", False, "negated"),
    (MI, "Final diagnosis: Aortic dissection, not MI", False, "negated"),
    (MI, "Final diagnosis: MI (ruled out)", False, "negated"),
    (MI, "Final diagnosis: MI vs aortic dissection", False, "multiple_diagnoses"),
    (MI, "An MI is possible given the risk factors, but the tearing pain radiates to the back.\n"
         "Final diagnosis: Aortic dissection", False, "distractor"),
    # --- PE
    (PE, "Final diagnosis: PE", True, "accepted"),
    (PE, "Final diagnosis: Pulmonary embolism (PE)", True, "accepted"),
    (PE, "Final diagnosis: PE (pulmonary embolism)", True, "accepted"),
    (PE, "Final diagnosis: Pulmonary emboli", True, "accepted"),
    (PE, "Final diagnosis: Acute pulmonary embolism", True, "accepted"),
    (PE, "Final diagnosis: Pulmonary embolism, probably", True, "accepted"),
    (PE, "Final diagnosis: Pulmonary embolism; pneumonia less likely", True, "accepted"),
    (PE, "Final diagnosis: Pulmonary embolism less likely than pneumonia", False, "negated"),
    (PE, "Final diagnosis: PE ruled out", False, "negated"),
    (PE, "Final diagnosis: Pneumonia", False, "distractor"),
    (PE, "Final diagnosis: pneumothorax", False, "distractor"),
    (PE, "Final diagnosis: Pulmonary hypertension", False, "wrong_diagnosis"),
    (PE, "Final diagnosis: PE/DVT", False, "multiple_diagnoses"),
    (PE, "The patient most likely has a pulmonary embolism, although pneumonia remains possible.",
     False, "multiple_diagnoses"),
    # --- DKA
    (DKA, "Final diagnosis: DKA", True, "accepted"),
    (DKA, "Final diagnosis: Diabetic ketoacidosis (DKA)", True, "accepted"),
    (DKA, "Final diagnosis: Severe diabetic ketoacidosis", True, "accepted"),
    (DKA, "Final diagnosis: DKA, moderate", True, "accepted"),
    (DKA, "The most likely diagnosis is DKA.", True, "accepted"),
    (DKA, "Final diagnosis: Hyperosmolar hyperglycemic state", False, "distractor"),  # US spelling of a UK distractor
    (DKA, "Final diagnosis: DKA or HHS", False, "multiple_diagnoses"),
    (DKA, "Final diagnosis: Alcoholic ketoacidosis", False, "distractor"),
    (DKA, "Final diagnosis: Ketoacidosis", False, "wrong_diagnosis"),
    (DKA, "Final diagnosis: Diabetic ketoacidosis with hypokalaemia", False, "multiple_diagnoses"),
    (DKA, "Final diagnosis: Euglycemic diabetic ketoacidosis", False, "wrong_diagnosis"),
    (DKA, "DKA was considered first.\nFinal diagnosis: Starvation ketosis", False, "wrong_diagnosis"),
    # --- pre-eclampsia / eclampsia
    (PREEC, "Final diagnosis: Pre-eclampsia", True, "accepted"),
    (PREEC, "Final diagnosis: Preeclampsia", True, "accepted"),
    (PREEC, "Final diagnosis: pre eclampsia", True, "accepted"),
    (PREEC, "Final diagnosis: Severe pre-eclampsia", True, "accepted"),
    (PREEC, "Final diagnosis: Preeclampsia with severe features", True, "accepted"),
    (PREEC, "Final diagnosis: Eclampsia", False, "distractor"),
    (PREEC, "Final diagnosis: HELLP syndrome", False, "distractor"),
    (PREEC, "Final diagnosis: Gestational hypertension", False, "distractor"),
    (ECL, "Final diagnosis: Eclampsia", True, "accepted"),
    (ECL, "Final diagnosis: Pre-eclampsia", False, "distractor"),
    (ECL, "Final diagnosis: Postpartum eclampsia", False, "wrong_diagnosis"),
    # --- thyroid: hypo/hyper, Graves spellings
    (GRAVES, "Final diagnosis: Graves' disease", True, "accepted"),
    (GRAVES, "Final diagnosis: Graves disease", True, "accepted"),
    (GRAVES, "Final diagnosis: Grave's disease", True, "accepted"),
    (GRAVES, "Final diagnosis: Graves", True, "accepted"),  # known miss: "disease" left out
    (GRAVES, "Final diagnosis: Hyperthyroidism", False, "wrong_diagnosis"),
    (GRAVES, "Final diagnosis: Hypothyroidism", False, "distractor"),
    (GRAVES, "Final diagnosis: Toxic multinodular goiter", False, "distractor"),
    (GRAVES, "Final diagnosis: Subacute thyroiditis", False, "distractor"),
    (HYPO, "Final diagnosis: Hypothyroidism", True, "accepted"),
    (HYPO, "Final diagnosis: Primary hypothyroidism", True, "accepted"),
    (HYPO, "Final diagnosis: Hypothyroidism, primary", True, "accepted"),
    (HYPO, "Final diagnosis: Hyperthyroidism", False, "distractor"),
    (HYPO, "Final diagnosis: Secondary hypothyroidism", False, "wrong_diagnosis"),
    (HYPO, "Final diagnosis: Subclinical hypothyroidism", False, "wrong_diagnosis"),
    # --- iron deficiency anaemia: British/American spelling, ICD order
    (IDA, "Final diagnosis: Iron deficiency anemia", True, "accepted"),
    (IDA, "Final diagnosis: Iron-deficiency anaemia", True, "accepted"),
    (IDA, "Final diagnosis: IDA", True, "accepted"),
    (IDA, "Final diagnosis: Anaemia, iron deficiency", True, "accepted"),
    (IDA, "Final diagnosis: Anemia", False, "wrong_diagnosis"),
    (IDA, "Final diagnosis: Anemia of chronic disease", False, "distractor"),
    (IDA, "Final diagnosis: Iron deficiency", False, "wrong_diagnosis"),
    (IDA, "Final diagnosis: Beta-thalassemia trait", False, "distractor"),
    (IDA, "Final diagnosis: Microcytic anaemia", False, "wrong_diagnosis"),
    # --- type 1 / type 2 diabetes
    (T1DM, "Final diagnosis: Type 1 diabetes mellitus", True, "accepted"),
    (T1DM, "Final diagnosis: Type I diabetes mellitus", True, "accepted"),
    (T1DM, "Final diagnosis: Diabetes mellitus, type 1", True, "accepted"),
    (T1DM, "Final diagnosis: T1DM", True, "accepted"),
    (T1DM, "Final diagnosis: Type 1 diabetes", True, "accepted"),
    (T1DM, "Final diagnosis: Type 2 diabetes mellitus", False, "distractor"),
    (T1DM, "Final diagnosis: Type II diabetes", False, "wrong_diagnosis"),
    (T1DM, "Final diagnosis: Diabetes mellitus", False, "wrong_diagnosis"),
    (T1DM, "Final diagnosis: Diabetes insipidus", False, "distractor"),
    (T1DM, "Final diagnosis: Latent autoimmune diabetes in adults", False, "wrong_diagnosis"),
    # --- side is part of the answer
    (RVI, "Final diagnosis: Right ventricular infarction", True, "accepted"),
    (RVI, "Final diagnosis: RV infarction", True, "accepted"),
    (RVI, "Final diagnosis: Infarction of the right ventricle", True, "accepted"),  # known miss: reworded
    (RVI, "Final diagnosis: Left ventricular infarction", False, "wrong_diagnosis"),
    (RVI, "Final diagnosis: Ventricular infarction", False, "wrong_diagnosis"),
    (RVI, "Final diagnosis: Left ventricular failure", False, "distractor"),
    (RHF, "Final diagnosis: Right heart failure", True, "accepted"),
    (RHF, "Final diagnosis: Heart failure, right-sided", True, "accepted"),
    (RHF, "Final diagnosis: Right-sided heart failure", True, "accepted"),
    (RHF, "Final diagnosis: Right sided heart failure", True, "accepted"),
    (RHF, "Final diagnosis: Left-sided heart failure", False, "distractor"),
    (RHF, "Final diagnosis: Heart failure", False, "wrong_diagnosis"),
    (RHF, "Final diagnosis: Biventricular heart failure", False, "wrong_diagnosis"),
    # --- harmless specification vs a different disease
    (PNEU, "Final diagnosis: Pneumonia", True, "accepted"),
    (PNEU, "Final diagnosis: Community-acquired pneumonia", True, "accepted"),
    (PNEU, "Final diagnosis: Community acquired pneumonia (CAP)", True, "accepted"),
    (PNEU, "Final diagnosis: Aspiration pneumonia", False, "wrong_diagnosis"),
    (PNEU, "Final diagnosis: Pneumocystis pneumonia", False, "wrong_diagnosis"),
    (PNEU, "Final diagnosis: Pneumonitis", False, "wrong_diagnosis"),
    (PNEU, "Final diagnosis: Lung cancer", False, "distractor"),
    (HEP, "Final diagnosis: Viral hepatitis", True, "accepted"),
    (HEP, "Final diagnosis: Acute viral hepatitis", True, "accepted"),
    (HEP, "Final diagnosis: Autoimmune hepatitis", False, "distractor"),
    (HEP, "Final diagnosis: Hepatitis", False, "wrong_diagnosis"),
    (HEP, "Final diagnosis: Alcoholic hepatitis", False, "distractor"),
    (UC, "Final diagnosis: Ulcerative colitis", True, "accepted"),
    (UC, "Final diagnosis: UC", True, "accepted"),
    (UC, "Final diagnosis: Colitis", False, "wrong_diagnosis"),
    (UC, "Final diagnosis: Crohn disease", False, "distractor"),
    (UC, "Final diagnosis: Infectious colitis", False, "distractor"),
    (CROHN, "Final diagnosis: Crohn disease", True, "accepted"),
    (CROHN, "Final diagnosis: Crohns disease", True, "accepted"),
    (CROHN, "Final diagnosis: Celiac disease", False, "distractor"),
    # --- names that contain "and" / hyphens
    (HFMD, "Final diagnosis: Hand, foot and mouth disease", True, "accepted"),
    (HFMD, "Final diagnosis: Hand, foot, and mouth disease", True, "accepted"),
    (HFMD, "Final diagnosis: hand-foot-and-mouth disease", True, "accepted"),
    (HFMD, "Final diagnosis: HFMD", True, "accepted"),
    (HFMD, "Final diagnosis: Herpangina", False, "distractor"),
    (HFMD, "Final diagnosis: Hand, foot and mouth disease or herpangina", False, "multiple_diagnoses"),
    (SJS, "Final diagnosis: Stevens-Johnson syndrome", True, "accepted"),
    (SJS, "Final diagnosis: Stevens Johnson syndrome (SJS)", True, "accepted"),
    (SJS, "Final diagnosis: Toxic epidermal necrolysis", False, "distractor"),
    (SJS, "Final diagnosis: SJS/TEN overlap", False, "multiple_diagnoses"),
    (SJS, "Final diagnosis: Erythema multiforme major", False, "wrong_diagnosis"),
    # --- British / American spelling
    (OES, "Final diagnosis: Esophageal carcinoma", True, "accepted"),
    (OES, "Final diagnosis: Oesophageal cancer", True, "accepted"),
    (OES, "Final diagnosis: Esophageal cancer", True, "accepted"),
    (OES, "Final diagnosis: Gastric carcinoma", False, "distractor"),
    (OES, "Final diagnosis: Oesophageal tumour", False, "wrong_diagnosis"),
    # --- multiple choice
    (MC, "Final diagnosis: C. Acute appendicitis", True, "accepted"),
    (MC, "**Final diagnosis: C. Acute appendicitis**", True, "accepted"),
    (MC, "Final diagnosis: C", True, "accepted"),
    (MC, "Final diagnosis: (C)", True, "accepted"),
    (MC, "Final diagnosis: C.", True, "accepted"),
    (MC, "Final diagnosis: Option C", True, "accepted"),
    (MC, "Final diagnosis: Option C: Acute appendicitis", True, "accepted"),
    (MC, "Answer: C", True, "accepted"),
    (MC, "Final diagnosis: C) Acute appendicitis", True, "accepted"),
    (MC, "Final diagnosis: Acute appendicitis", True, "accepted"),
    (MC, "Final diagnosis: Acute appendicitis (C)", True, "accepted"),
    (MC, REASONING + "The answer is C.", True, "accepted"),
    (MC, "Final diagnosis: B", False, "distractor"),
    (MC, "Final diagnosis: B. Ectopic pregnancy", False, "distractor"),
    (MC, "Final diagnosis: Ectopic pregnancy", False, "distractor"),
    (MC, "Options A and B are unlikely.\nFinal diagnosis: E. Renal colic", False, "distractor"),
    (MC, "Final diagnosis: C. Ectopic pregnancy", False, "multiple_diagnoses"),  # letter and text disagree
    (MC, "Final diagnosis: B. Acute appendicitis", False, "multiple_diagnoses"),  # letter and text disagree
    (MC, "Final diagnosis: C or D", False, "multiple_diagnoses"),
    (MC, "Final diagnosis: B/C", False, "multiple_diagnoses"),
    (MC, "Final diagnosis: Z", False, "wrong_diagnosis"),
    (MC2, "Final diagnosis: C. difficile colitis", True, "accepted"),  # option D's text, not letter C
    (MC2, "Final diagnosis: D. C. difficile colitis", True, "accepted"),
    (MC2, "Final diagnosis: D", True, "accepted"),
    (MC2, "Final diagnosis: Pseudomembranous colitis", True, "accepted"),
    (MC2, "Final diagnosis: C", False, "distractor"),
    (MC2, "Final diagnosis: C. Ulcerative colitis", False, "distractor"),
    (MC2, "Final diagnosis: Ischemic colitis", False, "distractor"),
    (PE, "Final diagnosis: Pulmonary edema", False, "wrong_diagnosis"),  # PE is not pulmonary (o)edema
    (PREEC, "Final diagnosis: Pre-eclampsia (not eclampsia)", True, "accepted"),
    (ECL, "Final diagnosis: Eclampsia (not pre-eclampsia)", True, "accepted"),
    (RHF, "Final diagnosis: Heart failure (right)", True, "accepted"),
    (RHF, "Final diagnosis: Heart failure (left)", False, "distractor"),
    (MI, "Final diagnosis: Takotsubo cardiomyopathy (mimicking MI)", False, "wrong_diagnosis"),
    (MI, "Final diagnosis: Type 2 MI", False, "wrong_diagnosis"),
    (MI, "Final diagnosis: Chronic myocardial infarction", False, "wrong_diagnosis"),
    (MC, "Final diagnosis: c", True, "accepted"),
    (MC, "Final diagnosis: C - Acute appendicitis", True, "accepted"),
    (MC, "Final diagnosis: C. Acute appendicitis\nThe answer is B.", False, "multiple_diagnoses"),
    (MC, "Answer: C \u2014 wait, actually B", False, "multiple_diagnoses"),
    # --- plain-English concluding sentences (read) and conclusions taken back later (never pass)
 # --- ordinary concluding sentences that must be read    (true accepts)
    (HEAT, R + "The most likely diagnosis for this patient is exertional heat stroke.", True, "accepted"),
    (HEAT, R + "The most likely diagnosis for him is exertional heat stroke.", True, "accepted"),
    (HEAT, R + "Therefore, the most likely diagnosis in this case is exertional heat stroke.", True, "accepted"),
    (HEAT, R + "The diagnosis that best explains these findings is exertional heat stroke.", True, "accepted"),
    (HEAT, R + "This presentation is most consistent with exertional heat stroke.", True, "accepted"),
    (HEAT, R + "Putting it together, this is exertional heat stroke.", True, "accepted"),
    (HEAT, R + "The likely diagnosis for this runner is exertional heat stroke.", True, "accepted"),
    (HEAT, R + "In summary, the patient has exertional heat stroke.", True, "accepted"),
    (HEAT, R + "These findings point to exertional heat stroke as the diagnosis.", True, "accepted"),
    (HEAT, R + "My diagnosis is exertional heat stroke.", True, "accepted"),
    (HEAT, R + "The best diagnosis for this patient would be exertional heat stroke.", True, "accepted"),
    (HEAT, R + "Exertional heat stroke is the most likely diagnosis for this patient.", True, "accepted"),
    (HEAT, R + "The most probable diagnosis here is exertional heat stroke.", True, "accepted"),
    (HEAT, R + "Final diagnosis: exertional heat stroke. Heat exhaustion is less likely because he is confused.", True, "accepted"),
    (APPY, REASONING + "The most likely diagnosis for this young man is acute appendicitis.", True, "accepted"),
    (PE, REASONING + "Overall the most likely diagnosis for her is pulmonary embolism.", True, "accepted"),
 # --- the last word: retracted, contradicted or qualified away    (true rejects)
    (HEAT, R + "Exertional heat stroke is the most likely diagnosis. But exertional heat stroke is the least likely diagnosis.", False, "negated"),
    (HEAT, R + "The most likely diagnosis is exertional heat stroke, but exertional heat stroke is the least likely diagnosis.", False, "multiple_diagnoses"),
    (HEAT, R + "Final diagnosis: exertional heat stroke. On balance this is not exertional heat stroke.", False, "negated"),
    (HEAT, R + "Final diagnosis: exertional heat stroke.\nOn balance this is not heat stroke.", False, "negated"),
    (HEAT, R + "Final diagnosis: exertional heat stroke\nOn reflection, exertional heat stroke is unlikely.", False, "negated"),
    (HEAT, R + "Final diagnosis: exertional heat stroke. Final diagnosis: heat exhaustion", False, "multiple_diagnoses"),
    (HEAT, R + "Final diagnosis: exertional heat stroke and then Final diagnosis: sepsis", False, "multiple_diagnoses"),
    (HEAT, R + "The most likely diagnosis is exertional heat stroke. So the final diagnosis: sepsis.", False, "multiple_diagnoses"),
    (HEAT, R + "The most likely diagnosis is exertional heat stroke.\nFinal diagnosis: heat exhaustion", False, "distractor"),
    (HEAT, R + "Final diagnosis: exertional heat stroke\nHowever, exertional heat stroke does not explain the rash, so it is not the diagnosis.", False, "negated"),
    (HEAT, R + "Final diagnosis: exertional heat stroke\nThis is not exertional heat stroke.", False, "negated"),
    (HEAT, R + "Exertional heat stroke is the most likely diagnosis. Exertional heat stroke is the least likely diagnosis.", False, "negated"),
    (HEAT, R + "Final diagnosis: exertional heat stroke. It is unlikely to be exertional heat stroke, though.", False, "negated"),
    (HEAT, R + "Final diagnosis: exertional heat stroke\nExertional heat stroke can be ruled out.", False, "negated"),
    (HEAT, R + "The most likely diagnosis is exertional heat stroke. Heat stroke is less likely than sepsis.", False, "negated"),
    (APPY, REASONING + "Final diagnosis: acute appendicitis\nOn balance, this is not appendicitis but ovarian torsion.", False, "negated"),
    (APPY, REASONING + "Acute appendicitis is the most likely diagnosis ... but acute appendicitis is the least likely diagnosis.", False, "negated"),
    (PE, REASONING + "Final diagnosis: pulmonary embolism. I no longer think it is a pulmonary embolism.", False, "negated"),
]

KNOWN_MISSES = {
    "The ECG shows ST elevation in II, III and aVF. The diagnosis is acute inferior MI.",
    "Final diagnosis: Graves",
    "Final diagnosis: Infarction of the right ventricle",
}


def _row_id(row):
    case, trace, _, code = row
    return f"{case.id}:{code}:{trace[-45:]!r}"


REJECT_ROWS = [r for r in TABLE if not r[2]]
ACCEPT_ROWS = [r for r in TABLE if r[2]]


def test_table_is_large_and_well_formed():
    assert len(TABLE) >= 100
    assert len(REJECT_ROWS) >= 40 and len(ACCEPT_ROWS) >= 40
    for case, trace, accepted, code in TABLE:
        assert code in CODES
        assert accepted == (code == "accepted")
    # every kind of rejection is exercised
    assert {code for *_, code in REJECT_ROWS} == set(CODES) - {"accepted"}


@pytest.mark.parametrize("row", REJECT_ROWS, ids=[_row_id(r) for r in REJECT_ROWS])
def test_true_rejects_are_rejected(row):
    case, trace, _, code = row
    verdict = check_trace(trace, case)
    assert isinstance(verdict, Verdict)
    assert verdict.accepted is False, verdict
    assert verdict.code == code, verdict
    assert verdict.reason


def test_precision_and_recall_over_the_table():
    tp = fp = fn = 0
    misses = []
    for case, trace, truth, _ in TABLE:
        got = check_trace(trace, case).accepted
        tp += got and truth
        fp += got and not truth
        fn += (not got) and truth
        if truth and not got:
            misses.append(trace)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn)
    print(f"\nverifier over {len(TABLE)} rows: precision={precision:.3f} recall={recall:.3f} misses={misses}")
    assert precision == 1.0
    assert recall >= 0.95
    # the documented conservative misses are the only ones
    assert set(misses) <= KNOWN_MISSES, set(misses) - KNOWN_MISSES


def test_accepted_rows_say_what_was_concluded():
    for case, trace, truth, _ in ACCEPT_ROWS:
        if trace in KNOWN_MISSES:
            continue
        v = check_trace(trace, case)
        assert v.code == "accepted" and v.diagnosis and "= answer" in v.reason, (trace, v)


# --------------------------------------------------------------------------- helpers


def test_verdict_to_dict():
    v = check_trace("Final diagnosis: pancreatitis", Case(id="x", question=Q, answer="Acute appendicitis",
                                                          distractors=["pancreatitis"]))
    assert v.to_dict() == {"accepted": False, "diagnosis": "pancreatitis",
                           "reason": "concluded 'pancreatitis', a distractor", "code": "distractor"}
    with pytest.raises(Exception):
        v.accepted = True  # frozen


def test_reasons_read_well():
    assert check_trace("Final diagnosis: Acute appendicitis", APPY).reason == "concluded 'Acute appendicitis' = answer"
    assert check_trace("Final diagnosis: not MI", MI).reason == "negated the answer: 'not MI'"
    assert check_trace("no conclusion here", APPY).reason == "no 'Final diagnosis:' line or concluding sentence"
    assert check_trace("Final diagnosis: MI or PE", MI).reason == "names several diagnoses: 'MI or PE'"
    assert check_trace("", APPY).diagnosis is None


@pytest.mark.parametrize(
    "a, b",
    [
        ("Appendicitis, acute", "acute appendicitis"),
        ("the acute appendicitis", "Acute Appendicitis."),
        ("Heart failure, right-sided", "right heart failure"),
        ("right-sided heart failure", "Right sided heart failure"),
        ("Iron deficiency anaemia", "iron-deficiency anemias"),
        ("Oedema", "edema"),
        ("Oesophageal tumour", "esophageal tumor"),
        ("Haemorrhage", "hemorrhage"),
        ("Crohn's disease", "Crohn disease"),
        ("Pre-eclampsia", "preeclampsia"),
        ("Type I diabetes mellitus", "type 1 diabetes mellitus"),
        ("**Most likely** acute appendicitis", "acute appendicitis"),
        ("gallstones", "gallstone"),
    ],
)
def test_normalise_equal(a, b):
    assert normalise_diagnosis(a) == normalise_diagnosis(b)


@pytest.mark.parametrize(
    "a, b",
    [
        ("pre-eclampsia", "eclampsia"),
        ("hypothyroidism", "hyperthyroidism"),
        ("type 1 diabetes", "type 2 diabetes"),
        ("left heart failure", "right heart failure"),
        ("ulcerative colitis", "colitis"),
        ("non-Hodgkin lymphoma", "Hodgkin lymphoma"),
    ],
)
def test_normalise_different(a, b):
    assert normalise_diagnosis(a) != normalise_diagnosis(b)


def test_extract_conclusion():
    assert extract_conclusion("blah\n**Final Diagnosis**: *Acute appendicitis*.\n") == "Acute appendicitis"
    assert extract_conclusion("Final diagnosis: X\nmore\nFinal diagnosis: Y") == "Y"
    assert extract_conclusion("## Final diagnosis\n\n- Pulmonary embolism\n") == "Pulmonary embolism"
    assert extract_conclusion("So the most likely diagnosis is DKA. Treat with insulin.") == "DKA"
    assert extract_conclusion("Final diagnosis: C. Acute appendicitis") == "C. Acute appendicitis"
    assert extract_conclusion("I think about MI and PE.") is None
    assert extract_conclusion("") is None


ALL_CASES = [APPY, MI, PE, DKA, PREEC, ECL, GRAVES, HYPO, IDA, T1DM, RVI, RHF, PNEU, HEP, UC, CROHN, HFMD, SJS, OES,
             MC, MC2]
FORMATS = ["**Final diagnosis:** {x}.", "{x} is the most likely diagnosis.", "Final diagnosis: most likely {x} (confirmed)",
           "Final diagnosis: acute {x}, severe"]
HEDGES = ["Final diagnosis: {a} or {d}", "Final diagnosis: {d}, not {a}", "Final diagnosis: {a}/{d}",
          "Final diagnosis: {a} vs {d}", "Final diagnosis: {a} and {d}", "Final diagnosis: {d} rather than {a}",
          "Final diagnosis: {a}\nFinal diagnosis: {d}", "The most likely diagnosis is {a}.\nFinal diagnosis: {d}",
          "Final diagnosis: {d} (not {a})", "Final diagnosis: {a} ({d})", "Final diagnosis: {a}, {d}",
          "Final diagnosis: {d}; {a} unlikely", "Final diagnosis: {a}; {d} also possible",
          "Final diagnosis: {a} with {d}", "Final diagnosis: {d} mimicking {a}", "Final diagnosis: {a}-like {d}"]


def test_other_cases_diagnoses_are_never_accepted():
    """Precision sweep: every other case's answer, aliases and distractors, in several
    formats, is rejected (unless it is the same disease as this case's answer)."""
    checked = 0
    for case in ALL_CASES:
        own = {normalise_diagnosis(n) for n in [case.answer, *case.aliases]}
        if case is MI:
            own.add(normalise_diagnosis("myocardial infarction"))  # licensed by the alias "MI"
        for other in ALL_CASES:
            if normalise_diagnosis(other.answer) in own:
                continue  # the same disease (APPY and MC)
            for x in [other.answer, *other.aliases, *other.distractors]:
                if normalise_diagnosis(x) in own:
                    continue
                for fmt in FORMATS:
                    checked += 1
                    assert not check_trace(fmt.format(x=x), case).accepted, (case.id, fmt.format(x=x))
    assert checked > 500


def test_answer_hedged_with_a_distractor_is_never_accepted():
    for case in ALL_CASES:
        wrong_options = [o for i, o in enumerate(case.options or []) if i != case.answer_idx]
        for d in case.distractors + wrong_options:
            for a in [case.answer, *case.aliases]:
                for fmt in HEDGES:
                    text = fmt.format(a=a, d=d)
                    assert not check_trace(text, case).accepted, (case.id, text)


# An accepted trace whose reasoning first concluded another candidate: the conclusion stands
# (the last word counts) and the phrase it first concluded is reported; None where the reasoning
# did not clearly conclude a candidate other than the answer.
EARLIER = [
    (APPY, "The most likely diagnosis is ovarian torsion. Pain migrated to the RLQ.\nFinal diagnosis: Acute appendicitis",
     "ovarian torsion"),
    (APPY, "These findings are most consistent with mesenteric adenitis.\n\nFinal diagnosis: acute appendicitis",
     "mesenteric adenitis"),
    (APPY, "Ectopic pregnancy is the most likely diagnosis here. But the test is negative.\nFinal diagnosis: appendicitis",
     "Ectopic pregnancy"),
    (APPY, "In summary, the patient has acute pancreatitis. Lipase is normal though.\nFinal diagnosis: Acute appendicitis",
     "acute pancreatitis"),
    (MI, "The most likely diagnosis is pericarditis. Then aortic dissection is the most likely diagnosis.\n"
         "Final diagnosis: Acute myocardial infarction", "pericarditis"),
    (MC, "To determine the answer, the correct answer is: A. Ovarian torsion.\nFinal diagnosis: C. Acute appendicitis",
     "A. Ovarian torsion"),
    (PE, REASONING + "The most likely diagnosis for this patient is pneumonia.\nFinal diagnosis: Pulmonary embolism",
     "pneumonia"),
    # not a disagreement: consistent, hypothetical, hedged, differential listing, no earlier conclusion
    (APPY, "The most likely diagnosis is acute appendicitis.\nFinal diagnosis: Acute appendicitis", None),
    (APPY, "If the diagnosis is ovarian torsion, surgery is urgent.\nFinal diagnosis: Acute appendicitis", None),
    (APPY, "Initially I thought the most likely diagnosis was ovarian torsion.\nFinal diagnosis: Acute appendicitis", None),
    (APPY, "The most likely diagnosis is appendicitis or ovarian torsion.\nFinal diagnosis: Acute appendicitis", None),
    (APPY, "Differential: ovarian torsion, ectopic pregnancy, appendicitis.\nFinal diagnosis: Acute appendicitis", None),
    (APPY, REASONING + "Final diagnosis: Acute appendicitis", None),
    (APPY, "We must rule out ovarian torsion. The diagnosis is not ectopic pregnancy.\nFinal diagnosis: appendicitis", None),
    (MI, "Aortic dissection is unlikely because pulses are equal.\nFinal diagnosis: Acute myocardial infarction", None),
]


@pytest.mark.parametrize("case,text,earlier", EARLIER)
def test_earlier_disagreement_is_reported_and_the_conclusion_stands(case, text, earlier):
    assert check_trace(text, case).accepted, text
    assert earlier_disagreement(text, case) == earlier
