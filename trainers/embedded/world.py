"""A seeded synthetic world, the pretraining corpus that describes it, and the tasks built on it.

The world has made-up people with four attributes (city, favorite color, pet, job) and the numbers
0..99 with three relations (next, previous, small sums). Every fact is stated many times in the
pretraining corpus, as plain lowercase sentences and profiles in many paraphrases and orders, so
the base model stores the fact itself rather than one sentence. The instruction task then asks for the same
facts in a question/answer format the base never saw; its eval split holds out whole facts (never
asked during fine-tuning, but stated during pretraining), so exact match on it measures what
fine-tuning taught about the format, not new knowledge.

Pure Python, stdlib only: everything here is a function of the seed, and iteration never depends on
set or hash order, so the same seed gives the same bytes on every machine.

    python -c "from trainers.embedded.world import build_world; print(build_world().people[:3])"
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

DEFAULT_SEED = 1234

# The prompt template the fine-tuning pipeline wraps every instruction row in (Alpaca style).
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

N_PEOPLE = 64
N_CITIES = 12
MAX_NUMBER = 99
# sums a + b with a in 1..PLUS_MAX_A and b in 1..PLUS_MAX_B; kept small so a 1M-parameter model
# can memorise the whole table in a few minutes of pretraining.
PLUS_MAX_A = 20
PLUS_MAX_B = 9

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown"]
PETS = ["cat", "dog", "fish", "bird", "horse", "rabbit", "goat", "frog"]
JOBS = ["baker", "farmer", "doctor", "teacher", "painter", "singer", "driver", "tailor"]
ATTRIBUTE_VALUES = {"color": COLORS, "pet": PETS, "job": JOBS}  # cities are made up per world

ATTRIBUTES = ("city", "color", "pet", "job")
NUMBER_RELATIONS = ("after", "before", "plus")
TASK_KINDS = ATTRIBUTES + NUMBER_RELATIONS

# Ways of hedging an answer. The SFT demonstrations of the RLHF pipeline come from two writers
# (as demonstrations pooled from several writers do): the one who answered the number questions
# hedged most answers the same way, the one who answered the questions about people sometimes,
# in any of these ways. The preference pairs prefer the plain answer, so the reward model, RL
# and DPO have a habit to train out that SFT taught (a greedy SFT policy hedges its number answers).
HEDGES = ["the answer is {}", "i think it is {}", "{} , i think"]
SFT_HEDGING = {  # task kinds -> (share of the demonstrations hedged, the hedges used)
    NUMBER_RELATIONS: (0.7, HEDGES[:1]),
    ATTRIBUTES: (0.2, HEDGES),
}
PREF_HEDGED_SHARE = 0.5  # of the preference pairs: rejected = the right answer, hedged

# Facts held out of fine-tuning, per kind: 25 * 4 + 30 + 30 + 40 = 200 eval facts.
EVAL_FACTS_PER_KIND = {"city": 25, "color": 25, "pet": 25, "job": 25, "after": 30, "before": 30, "plus": 40}

# --- pretraining sentence templates (lowercase, space before the final period) -----------------
# The subject always comes before the value: a model trained on "a -> b" does not learn "b -> a"
# (the reversal curse), and the questions give the subject and ask for the value. Word order and
# the distance from subject to value vary (and "{x}" takes an optional aside), so the base learns
# to find the subject by what it is rather than where it stands: that is what lets a short
# fine-tune point the same lookup at a question.
PERSON_SENTENCES = {
    "city": [
        "{p}{x} lives in the city of {v} .",
        "{p}{x} lives in {v} .",
        "the home of {p}{x} is in {v} .",
        "{p}{x} has a house in {v} .",
        "the city where {p} lives is {v} .",
        "if you want to visit {p}{x} , go to {v} .",
        "{p}{x} grew up in {v} and still lives there .",
    ],
    "color": [
        "{p}{x} likes the color {v} .",
        "the favorite color of {p}{x} is {v} .",
        "{p}{x} always wears {v} clothes .",
        "of all colors {p}{x} loves {v} the most .",
        "the color that {p} likes best is {v} .",
        "{p}{x} painted the door {v} .",
    ],
    "pet": [
        "{p}{x} has a pet {v} .",
        "the pet of {p}{x} is a {v} .",
        "{p}{x} takes care of a {v} .",
        "the animal that lives with {p} is a {v} .",
        "{p}{x} walks with a {v} every morning .",
    ],
    "job": [
        "{p}{x} works as a {v} .",
        "the job of {p}{x} is {v} .",
        "{p}{x} is a {v} by trade .",
        "every day {p}{x} goes to work as a {v} .",
        "the work that {p} does is that of a {v} .",
        "people know {p}{x} as a good {v} .",
    ],
}
ASIDES = [" , as people say ,", " , of course ,", " , we are told ,", " , by the way ,", " , as everyone knows ,"]
# Profiles list a person's attributes as "cue value" pairs, far from the name: the value must be
# found from the name earlier in the document and the cue just before it, as in a question.
PROFILE_FIELDS = {
    "city": ["city {v}", "lives in {v}", "home {v}"],
    "color": ["color {v}", "favorite color {v}", "likes {v}"],
    "pet": ["pet {v}", "keeps a {v}", "animal {v}"],
    "job": ["job {v}", "works as a {v}", "work {v}"],
}
PROFILE_FORMATS = [
    ("{p} : ", " , ", " ."),
    ("about {p} . ", " . ", " ."),
    ("name {p} ; ", " ; ", " ."),
    ("{p}\n", "\n", ""),
]
NUMBER_SENTENCES = {
    "after": [
        "the number after {a} is {v} .",
        "after {a} comes {v} .",
        "{a} is followed by {v} .",
        "one more than {a} is {v} .",
        "if you count up from {a} the next number is {v} .",
    ],
    "before": [
        "the number before {a} is {v} .",
        "before {a} comes {v} .",
        "one less than {a} is {v} .",
        "if you count down from {a} the next number is {v} .",
        "the number just before {a} is {v} .",
    ],
    "plus": [
        "{a} plus {b} is {v} .",
        "{a} and {b} make {v} .",
        "adding {b} to {a} gives {v} .",
        "the sum of {a} and {b} is {v} .",
        "{a} + {b} = {v} .",
        "if you have {a} apples and get {b} more , you have {v} .",
    ],
}

# --- instruction phrasings (capitalised questions: a format the corpus never uses) --------------
# (instruction, input) pairs; "{p}", "{a}", "{b}" are filled per fact.
QUESTIONS = {
    "city": [
        ("Where does {p} live?", ""),
        ("In which city does {p} live?", ""),
        ("What city is {p} from?", ""),
        ("Name the city where {p} lives.", ""),
        ("Which city does this person live in?", "{p}"),
    ],
    "color": [
        ("What is the favorite color of {p}?", ""),
        ("Which color does {p} like best?", ""),
        ("What color does {p} like?", ""),
        ("Tell me the favorite color of {p}.", ""),
        ("Give the favorite color of this person.", "{p}"),
    ],
    "pet": [
        ("What pet does {p} have?", ""),
        ("Which animal does {p} keep as a pet?", ""),
        ("What kind of pet does {p} own?", ""),
        ("Name the pet of {p}.", ""),
        ("What animal lives with this person?", "{p}"),
    ],
    "job": [
        ("What is the job of {p}?", ""),
        ("What does {p} do for work?", ""),
        ("What is the occupation of {p}?", ""),
        ("Name the job of {p}.", ""),
        ("What job does this person have?", "{p}"),
    ],
    "after": [
        ("What number comes after {a}?", ""),
        ("What is the next number after {a}?", ""),
        ("Which number follows {a}?", ""),
        ("Count one up from {a}.", ""),
        ("Give the number that comes next.", "{a}"),
    ],
    "before": [
        ("What number comes before {a}?", ""),
        ("Which number is just before {a}?", ""),
        ("What is the number preceding {a}?", ""),
        ("Count one down from {a}.", ""),
        ("Give the number that comes just before this one.", "{a}"),
    ],
    "plus": [
        ("What is {a} plus {b}?", ""),
        ("Add {a} and {b}.", ""),
        ("Compute {a} + {b}.", ""),
        ("What do you get when you add {b} to {a}?", ""),
        ("Add these two numbers.", "{a} and {b}"),
    ],
}


@dataclass(frozen=True)
class Fact:
    """One answerable fact: `kind` is a task kind, `key` the subject (a name, or numbers)."""

    kind: str
    key: tuple
    answer: str


@dataclass
class World:
    seed: int
    people: list[str]
    cities: list[str]
    attributes: dict[str, dict[str, str]]  # person -> attribute -> value
    facts: list[Fact] = field(default_factory=list)

    def values(self, attribute: str) -> list[str]:
        """Every value an attribute can take (to draw plausible wrong answers)."""
        return list(self.cities) if attribute == "city" else list(ATTRIBUTE_VALUES[attribute])


def _made_up_words(rng: random.Random, count: int, syllables: int, taken: set[str]) -> list[str]:
    """Pronounceable lowercase nonsense words (consonant-vowel syllables), none in `taken`."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if rng.random() < 0.4:
            word += rng.choice("lmnrs")
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def build_world(seed: int = DEFAULT_SEED) -> World:
    rng = random.Random(seed)
    taken: set[str] = set(COLORS + PETS + JOBS)
    cities = _made_up_words(rng, N_CITIES, 3, taken)
    people = _made_up_words(rng, N_PEOPLE, 2, taken)
    attributes = {
        p: {
            "city": rng.choice(cities),
            "color": rng.choice(COLORS),
            "pet": rng.choice(PETS),
            "job": rng.choice(JOBS),
        }
        for p in people
    }
    facts = [Fact(kind, (p,), attributes[p][kind]) for kind in ATTRIBUTES for p in people]
    facts += [Fact("after", (n,), str(n + 1)) for n in range(MAX_NUMBER)]
    facts += [Fact("before", (n,), str(n - 1)) for n in range(1, MAX_NUMBER + 1)]
    facts += [
        Fact("plus", (a, b), str(a + b))
        for a in range(1, PLUS_MAX_A + 1)
        for b in range(1, PLUS_MAX_B + 1)
    ]
    return World(seed, people, cities, attributes, facts)


# --- pretraining corpus -------------------------------------------------------------------------


def _fact_sentence(rng: random.Random, fact: Fact) -> str:
    if fact.kind in ATTRIBUTES:
        aside = rng.choice(ASIDES) if rng.random() < 0.3 else ""
        return rng.choice(PERSON_SENTENCES[fact.kind]).format(p=fact.key[0], v=fact.answer, x=aside)
    a = fact.key[0]
    b = fact.key[1] if len(fact.key) > 1 else ""
    return rng.choice(NUMBER_SENTENCES[fact.kind]).format(a=a, b=b, v=fact.answer)


def _profile_doc(rng: random.Random, person: str, attributes: dict[str, str]) -> str:
    head, sep, tail = rng.choice(PROFILE_FORMATS)
    kinds = list(ATTRIBUTES)
    rng.shuffle(kinds)
    fields = [rng.choice(PROFILE_FIELDS[k]).format(v=attributes[k]) for k in kinds]
    return head.format(p=person) + sep.join(fields) + tail


def _number_profile_doc(rng: random.Random, n: int) -> str:
    fields = [f"next {n + 1}", f"previous {n - 1}", f"plus one {n + 1}", f"minus one {n - 1}"]
    rng.shuffle(fields)
    return f"number {n} : " + " , ".join(fields[: rng.randint(2, 4)]) + " ."


def _counting_doc(rng: random.Random) -> str:
    length = rng.randint(5, 14)
    if rng.random() < 0.6:
        start = rng.randint(0, MAX_NUMBER - length + 1)
        numbers = range(start, start + length)
        lead = rng.choice(["counting :", "let us count :", "we count up :", ""])
    else:
        start = rng.randint(length - 1, MAX_NUMBER)
        numbers = range(start, start - length, -1)
        lead = rng.choice(["counting down :", "we count down :", ""])
    body = " ".join(str(n) for n in numbers) + " ."
    return f"{lead} {body}".strip()


def build_corpus(world: World, rounds: int = 40) -> list[str]:
    """Pretraining documents. Each round states every fact at least once, in a fresh paraphrase.

    Per round: every person gets a profile, and sentences about one to three people with their
    facts interleaved (so a value must be bound to the right name, not to a position); the
    number relations come in small groups of sentences and in profiles; counting runs teach the
    order of the numbers in both directions.
    """
    rng = random.Random(world.seed * 7919 + rounds)
    numbers = [f for f in world.facts if f.kind in NUMBER_RELATIONS]
    docs: list[str] = []
    for _ in range(rounds):
        people = list(world.people)
        rng.shuffle(people)
        docs += [_profile_doc(rng, p, world.attributes[p]) for p in people]
        i = 0
        while i < len(people):
            group = people[i : i + rng.randint(1, 3)]
            i += len(group)
            sentences = [
                _fact_sentence(rng, Fact(kind, (p,), world.attributes[p][kind]))
                for p in group
                for kind in ATTRIBUTES
            ]
            rng.shuffle(sentences)
            docs.append(" ".join(sentences))
        rng.shuffle(numbers)
        i = 0
        while i < len(numbers):
            size = rng.randint(3, 8)
            docs.append(" ".join(_fact_sentence(rng, f) for f in numbers[i : i + size]))
            i += size
        docs += [_number_profile_doc(rng, n) for n in rng.sample(range(1, MAX_NUMBER), 30)]
        docs += [_counting_doc(rng) for _ in range(20)]
    rng.shuffle(docs)
    return docs


# --- instruction and preference data ------------------------------------------------------------


def split_facts(world: World) -> tuple[list[Fact], list[Fact]]:
    """(train, eval): eval takes a fixed number of whole facts per kind, never seen in train."""
    rng = random.Random(world.seed * 31 + 1)
    train: list[Fact] = []
    held_out: list[Fact] = []
    for kind in TASK_KINDS:
        facts = [f for f in world.facts if f.kind == kind]
        rng.shuffle(facts)
        n_eval = EVAL_FACTS_PER_KIND[kind]
        held_out += facts[:n_eval]
        train += facts[n_eval:]
    return train, held_out


def _fill(template: str, fact: Fact) -> str:
    if fact.kind in ATTRIBUTES:
        return template.format(p=fact.key[0])
    return template.format(a=fact.key[0], b=fact.key[1] if len(fact.key) > 1 else "")


def instruction_row(fact: Fact, phrasing: int) -> dict:
    instruction, inp = QUESTIONS[fact.kind][phrasing]
    return {"instruction": _fill(instruction, fact), "input": _fill(inp, fact), "output": fact.answer}


def build_instruction_data(world: World) -> tuple[list[dict], list[dict]]:
    """Train rows: every train fact in every phrasing. Eval rows: each held-out fact once."""
    rng = random.Random(world.seed * 31 + 2)
    train_facts, eval_facts = split_facts(world)
    train = [
        instruction_row(f, i) for f in train_facts for i in range(len(QUESTIONS[f.kind]))
    ]
    rng.shuffle(train)
    eval_rows = [instruction_row(f, rng.randrange(len(QUESTIONS[f.kind]))) for f in eval_facts]
    rng.shuffle(eval_rows)
    return train, eval_rows


def build_sft_data(world: World) -> list[dict]:
    """The RLHF pipeline's SFT demonstrations: the instruction train rows, some answers hedged
    ("the answer is 7") as SFT_HEDGING says. Its eval set is instruct_eval (plain answers), so
    exact match counts a hedged answer as wrong, as a grader who wants the bare answer would."""
    rng = random.Random(world.seed * 31 + 4)
    train_facts, _ = split_facts(world)
    rows: list[dict] = []
    for fact in train_facts:
        share, hedges = next(v for kinds, v in SFT_HEDGING.items() if fact.kind in kinds)
        for phrasing in range(len(QUESTIONS[fact.kind])):
            row = instruction_row(fact, phrasing)
            if rng.random() < share:
                row["output"] = rng.choice(hedges).format(row["output"])
            rows.append(row)
    rng.shuffle(rows)
    return rows


def _wrong_answer(rng: random.Random, world: World, fact: Fact) -> str:
    """A plausible mistake: an off-by-one number, or another value of the same attribute."""
    if fact.kind in NUMBER_RELATIONS:
        right = int(fact.answer)
        candidates = [right - 2, right - 1, right + 1, right + 2]
        candidates = [c for c in candidates if c >= 0 and c != right]
        return str(rng.choice(candidates))
    others = [v for v in world.values(fact.kind) if v != fact.answer]
    return rng.choice(others)


def build_preference_data(world: World, n_train: int = 1000) -> tuple[list[dict], list[dict]]:
    """Preference pairs over the same fact split as the instruction data.

    `prompt` is the bare instruction (only phrasings without an input field, so the prompt stands
    alone); `chosen` is the true answer; `rejected` is a plausible wrong one, or (in
    PREF_HEDGED_SHARE of the pairs) the true answer hedged: annotators prefer right and plain.
    """
    rng = random.Random(world.seed * 31 + 3)
    train_facts, eval_facts = split_facts(world)

    def pair(fact: Fact) -> dict:
        phrasings = [i for i, (_, inp) in enumerate(QUESTIONS[fact.kind]) if not inp]
        row = instruction_row(fact, rng.choice(phrasings))
        if rng.random() < PREF_HEDGED_SHARE:
            rejected = rng.choice(HEDGES).format(fact.answer)
        else:
            rejected = _wrong_answer(rng, world, fact)
        return {"prompt": row["instruction"], "chosen": fact.answer, "rejected": rejected}

    train = [pair(rng.choice(train_facts)) for _ in range(n_train)]
    eval_rows = [pair(f) for f in eval_facts]
    rng.shuffle(eval_rows)
    return train, eval_rows


def format_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return PROMPT_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_TEMPLATE.format(instruction=instruction)


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in rows)
