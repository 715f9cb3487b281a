"""A deterministic generator of synthetic children's stories (the built-in, offline corpus).

Everything here is written by this project: no text comes from elsewhere. The stories follow a
beginning -> problem -> resolution -> moral arc with named characters whose pronouns stay consistent,
animals, objects, places, feelings and quoted dialogue. The layout matches TinyStories: each story is
followed by a line ``<|endoftext|>``.

Why templates and not free text: a small model trained for a few CPU minutes must be able to learn the
corpus. Templates give real, learnable structure (agreement, coreference, arcs that match their
morals) while the combinatorics of names, places, objects and sentence variants keep it from being
memorised outright.

Determinism: all randomness comes from one ``random.Random(seed)``; no global state is touched, so
the same seed gives the same bytes on every platform and Python >= 3.11.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llm.bpe import EOT
from llm.fileio import check_writable, replacing

# The largest corpus generate_stories writes: 10 GB (TinyStories is 2.2 GB), about 14 minutes at ~12 MB/s.
# A synthetic demo corpus has no use beyond that, and a typo (--size-mb 1e12) must not fill the disk.
MAX_SIZE_MB = 10_000
GENERATOR_VERSION = 2  # bump whenever the output for a given seed changes (ensure_demo_data regenerates)

# ----------------------------------------------------------------------------- vocabulary

GIRLS = [
    "Lily", "Mia", "Emma", "Sara", "Anna", "Lucy", "Zoe", "Amy", "Ella", "Rosa", "Nora", "Ruby",
    "Maya", "Grace", "Chloe", "Daisy", "Hannah", "Ivy", "Kate", "Lena", "Molly", "Nina", "Olive",
    "Poppy", "Sophie", "Tara", "Jenny", "Alice", "Bella", "Clara",
]
BOYS = [
    "Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Jake", "Noah", "Owen", "Luke",
    "Adam", "Eli", "Henry", "Hugo", "Joe", "Kai", "Liam", "Milo", "Ned", "Oscar", "Paul", "Ryan",
    "Theo", "Will", "Danny", "Felix", "Oliver", "Peter",
]
# Animal heroes: (kind, name, pronoun). Fixed pairs so a name always keeps its pronoun.
ANIMALS = [
    ("bunny", "Pip", "he"), ("cat", "Mittens", "she"), ("dog", "Buddy", "he"), ("bear", "Bruno", "he"),
    ("fox", "Rusty", "he"), ("bird", "Tweety", "she"), ("duck", "Dolly", "she"), ("mouse", "Squeak", "he"),
    ("frog", "Hoppy", "he"), ("squirrel", "Nutty", "she"), ("owl", "Hoot", "he"), ("pig", "Rosie", "she"),
    ("lamb", "Fluffy", "she"), ("turtle", "Shelly", "she"), ("puppy", "Spot", "he"), ("kitten", "Luna", "she"),
    ("elephant", "Ellie", "she"), ("lion", "Leo", "he"), ("monkey", "Coco", "she"), ("horse", "Star", "she"),
]
PRONOUNS = {
    "she": {"he": "she", "him": "her", "his": "her", "hers": "hers", "himself": "herself"},
    "he": {"he": "he", "him": "him", "his": "his", "hers": "his", "himself": "himself"},
}
TRAITS = ["little", "kind", "curious", "brave", "shy", "happy", "clever", "friendly", "gentle", "cheerful", "small", "playful",
          "sleepy", "funny", "quiet", "polite", "busy", "smart"]
ELDERS = [("mom", "she"), ("dad", "he"), ("grandma", "she"), ("grandpa", "he"), ("big sister", "she"), ("big brother", "he"),
          ("aunt", "she"), ("uncle", "he")]
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "brown", "shiny"]

# Places: (name, preposition phrase used after "went to", a description sentence pool key)
PLACES = {
    "park": ["The grass was green and soft.", "Children were laughing on the swings.", "The sun was warm and bright."],
    "garden": ["Pretty flowers grew everywhere.", "Bees were buzzing around the roses.", "The air smelled sweet."],
    "forest": ["The trees were tall and the leaves were green.", "Birds sang high in the branches.", "It was cool and quiet under the trees."],
    "beach": ["The sand was warm and the waves were big.", "Seagulls flew over the blue water.", "Shells lay everywhere on the sand."],
    "farm": ["Cows and sheep were eating grass.", "A big red barn stood near the field.", "The hens were clucking in the yard."],
    "pond": ["Ducks were swimming on the water.", "Frogs sat on the big green leaves.", "The water was still and clear."],
    "meadow": ["Tall grass moved in the wind.", "Butterflies danced over the flowers.", "The sky was wide and blue."],
    "playground": ["There was a big slide and a sandbox.", "Kids were running and shouting.", "The swings went up and down."],
    "hill": ["From the top, you could see the whole town.", "The wind was strong up there.", "Soft grass covered the hill."],
    "river": ["The water sparkled in the sun.", "Little fish swam near the rocks.", "A wooden bridge went over the water."],
    "town": ["The streets were busy and full of people.", "There was a bakery that smelled of fresh bread.", "Colorful shops lined the street."],
    "library": ["Rows of books stood on tall shelves.", "It was quiet and cozy inside.", "A big window let in the sun."],
    "lake": ["The lake was calm and blue.", "Boats with white sails floated on the water.", "Tall reeds grew by the shore."],
    "market": ["There were piles of red apples and yellow bananas.", "People were buying fruit and bread.", "A man was selling flowers."],
    "backyard": ["There was a big tree with a swing.", "The grass needed to be cut.", "A little fence went all around it."],
    "zoo": ["The monkeys were swinging from ropes.", "A big lion was sleeping in the sun.", "Children were pointing at the giraffes."],
}
WEATHER = ["It was a sunny day.", "The sky was blue and clear.", "It was a warm and windy day.", "The morning was bright and fresh.",
           "Fluffy white clouds floated in the sky.", "A soft breeze was blowing.", "The air was cool and fresh after the rain."]
TIMES = ["day", "morning", "afternoon", "sunny day", "summer day", "spring morning", "bright morning"]

# Objects by what can happen to them.
TOYS = ["ball", "kite", "teddy bear", "toy car", "doll", "toy boat", "book", "hat", "drum", "balloon", "toy train", "blanket", "cup", "robot", "scarf", "shovel",
        "puzzle", "yo-yo", "jump rope", "toy plane", "bucket", "puppet"]
LOSABLE = ["ball", "teddy bear", "toy car", "doll", "hat", "toy train", "robot", "scarf", "shovel", "blanket", "book", "cup", "yo-yo", "puppet", "bucket"]
STUCK = [("kite", "tree"), ("ball", "roof"), ("balloon", "tree"), ("hat", "fence"), ("ball", "tree"), ("kite", "roof"), ("frisbee", "tree"), ("scarf", "branch")]
BREAKABLE = ["toy car", "robot", "doll", "toy train", "kite", "drum", "toy boat", "toy plane", "puppet", "cup"]
FOODS = [("apple", "apples"), ("cookie", "cookies"), ("cake", "cakes"), ("sandwich", "sandwiches"), ("banana", "bananas"),
         ("cupcake", "cupcakes"), ("pie", "pies"), ("candy", "candies"), ("orange", "oranges"), ("muffin", "muffins")]
BAKED = [("cake", "cakes"), ("pie", "pies"), ("cookie", "cookies"), ("muffin", "muffins"), ("cupcake", "cupcakes")]
LIKES = [
    "play outside", "run in the grass", "sing songs", "draw pictures", "read books", "build with blocks",
    "look at the clouds", "jump in puddles", "help others", "dance", "climb trees", "play with friends",
    "watch the birds", "collect shells", "ride a bike", "bake cookies", "paint", "play hide and seek",
    "swing on the swings", "pick flowers", "make up stories", "chase butterflies", "build sand castles",
    "feed the ducks", "look at the stars", "splash in the water", "play with a ball", "sing with the birds",
]
FEARS = [  # (what, the moment it happens: a full sentence)
    ("the dark", "One night, the lights went out and the room was very dark."),
    ("thunder", "One night, a big storm came, and the thunder went boom."),
    ("the big dog next door", "One day, the big dog next door ran to the fence and barked."),
    ("deep water", "One day at the pool, all of {his} friends jumped into the deep water."),
    ("the tall slide", "One day at the playground, it was {name}'s turn to go down the tall slide."),
    ("bugs", "One day, a big bug landed right on {his} arm."),
]
SKILLS = [
    ("ride a bike", "fell off the bike", "rode all the way down the street"),
    ("swim", "sank and swallowed some water", "swam across the pool"),
    ("tie shoes", "made a big knot", "tied a perfect bow"),
    ("climb the rope", "slipped down", "reached the top of the rope"),
    ("fly a kite", "watched the kite crash", "made the kite fly high in the sky"),
    ("catch a ball", "dropped the ball", "caught the ball with both hands"),
    ("whistle", "only made a funny sound", "whistled a happy tune"),
    ("read a whole book", "got stuck on a hard word", "read the whole book out loud"),
]
CONTESTS = ["a race", "a drawing contest", "a spelling game", "a sand castle contest", "a jumping game", "a singing show"]

MORALS = {
    "lost": [
        "{Name} learned that it is good to keep your things in a safe place.",
        "From that day on, {name} always put {his} {obj} away after playing.",
        "{Name} learned that a friend can help you find what you lost.",
    ],
    "stuck": [
        "{Name} learned that asking for help is a smart thing to do.",
        "From that day on, {name} was careful when {he} played near the {spot}.",
        "{Name} learned that when you work together, big problems become small.",
    ],
    "broken": [
        "{Name} learned that things that break can often be fixed with patience.",
        "From that day on, {name} played more gently with {his} toys.",
        "{Name} learned that saying sorry and helping can make things right.",
    ],
    "fear": [
        "{Name} learned that being brave does not mean you are never scared.",
        "From that day on, {name} was not afraid of {fear} anymore.",
        "{Name} learned that things are often less scary than they seem.",
    ],
    "share": [
        "{Name} learned that sharing makes everyone happy.",
        "From that day on, {name} and {fname} always shared their toys.",
        "{Name} learned that playing together is more fun than playing alone.",
    ],
    "animal": [
        "{Name} learned that it is important to be kind to animals.",
        "From that day on, {name} visited the little {animal} every day.",
        "{Name} learned that even a small act of kindness can make a big difference.",
    ],
    "skill": [
        "{Name} learned that if you keep trying, you can do hard things.",
        "From that day on, {name} never gave up when something was hard.",
        "{Name} learned that practice helps you get better.",
    ],
    "contest": [
        "{Name} learned that having fun is more important than winning.",
        "From that day on, {name} was happy for {his} friends when they won.",
        "{Name} learned that doing your best is what matters.",
    ],
    "rain": [
        "{Name} learned that a change of plans can still be fun.",
        "From that day on, {name} was not sad when it rained.",
        "{Name} learned that you can have fun anywhere if you are with people you love.",
    ],
    "lost_way": [
        "{Name} learned to always stay close to {his} {elder}.",
        "From that day on, {name} always held {his} {elder}'s hand in busy places.",
        "{Name} learned that it is smart to stay calm and ask for help when you are lost.",
    ],
    "lie": [
        "{Name} learned that telling the truth is always the right thing to do.",
        "From that day on, {name} always told the truth, even when it was hard.",
        "{Name} learned that a lie can make a small problem bigger.",
    ],
    "new_friend": [
        "{Name} learned that saying hello is the first step to making a friend.",
        "From that day on, {name} always said hello to new children.",
        "{Name} learned that a little courage can bring a new friend.",
    ],
    "mess": [
        "{Name} learned that it is important to clean up after yourself.",
        "From that day on, {name} always asked for help before making something.",
        "{Name} learned that fixing a mistake is better than hiding it.",
    ],
    "sick": [
        "{Name} learned that good friends take care of each other.",
        "From that day on, {name} always helped friends who were sick or sad.",
        "{Name} learned that kindness can help someone feel better.",
    ],
    "gift": [
        "{Name} learned that the best gifts come from the heart.",
        "From that day on, {name} loved to make gifts for the people {he} loved.",
        "{Name} learned that giving can feel even better than getting.",
    ],
}

CONNECT_THEN = ["Then", "After that", "Soon", "Next", "A moment later"]
CONNECT_BUT = ["But", "But then,", "Suddenly,", "All of a sudden,", "Just then,"]
CONNECT_END = ["In the end", "At last", "Finally", "After a while"]


# ----------------------------------------------------------------------------- story builder


class _Story:
    """Collects sentences for one story; ``say`` fills ``{slots}`` from the story's context."""

    def __init__(self, r: random.Random) -> None:
        self.r = r
        self.c: dict[str, str] = {}
        self.paragraphs: list[list[str]] = [[]]
        self.friend_seen = False  # endings may name the friend only once the story has introduced them

    def pick(self, options: list):
        return options[self.r.randrange(len(options))]

    def set_person(self, prefix: str, name: str, pronoun: str) -> None:
        """Bind name + pronoun forms under a prefix ('' for the hero, 'f' for the friend)."""
        c = self.c
        for k, v in {"name": name, **PRONOUNS[pronoun]}.items():
            key = prefix + k
            c[key] = v
            c[key[0].upper() + key[1:]] = v[0].upper() + v[1:]

    def say(self, *options: str) -> None:
        """Append one of ``options`` (chosen at random), formatted and capitalised."""
        t = self.pick(list(options))
        self.friend_seen |= "{fname}" in t or "{Fname}" in t
        s = t.format(**self.c)
        self.paragraphs[-1].append(s[0].upper() + s[1:])

    def new_paragraph(self) -> None:
        if self.paragraphs[-1]:
            self.paragraphs.append([])

    def text(self) -> str:
        return "\n\n".join(" ".join(p) for p in self.paragraphs if p)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# A plot is a sequence of steps, read by ``_tell``: a tuple of alternative sentences (``say`` picks
# one), PARAGRAPH, or a function for the parts with real logic (chances, the place's own sentences).
# Written as data because the same say/new_paragraph shape was otherwise spelled out 40+ times.
PARAGRAPH = None
Step = tuple[str, ...] | Callable[[_Story], None] | None


def _tell(s: _Story, steps: tuple[Step, ...]) -> None:
    for step in steps:
        if step is PARAGRAPH:
            s.new_paragraph()
        elif callable(step):
            step(s)
        else:
            s.say(*step)


def _describe_place(s: _Story) -> None:
    s.say(*PLACES[s.c["place"]])


def _intro(s: _Story) -> None:
    c = s.c
    s.say(
        "Once upon a time, there was {a_trait} {kind} named {name}.",
        "Once upon a time, in a small town, there lived {a_trait} {kind} named {name}.",
        "Once there was {a_trait} {kind} called {name}.",
        "Early one {time0}, {a_trait} {kind} named {name} woke up with a smile.",
        "{Name} was {a_trait} {kind} who lived near the {place}.",
        "There once was {a_trait} {kind} named {name}.",
        "In a little house by the {place}, there lived {a_trait} {kind} named {name}.",
        "Not long ago, there was {a_trait} {kind} called {name}.",
    )
    s.say(
        "{He} loved to {like}.",
        "{He} liked to {like} more than anything.",
        "Every day, {he} wanted to {like}.",
        "{Name} loved to {like} with {his} {elder}.",
    )
    if "obj" in c and s.r.random() < 0.6:
        s.say(
            "{His} favorite toy was {a_color} {obj}.",
            "{Name} had {a_color} {obj} that {he} loved very much.",
            "{He} took {his} {color} {obj} everywhere {he} went.",
        )


def _setting(s: _Story) -> None:
    s.say(
        "One {time}, {name} went to the {place} with {his} {elder}.",
        "One {time}, {name} and {his} {elder} went to the {place}.",
        "One {time}, {name} went to play at the {place}.",
        "{Connect_then}, {name} ran to the {place}.",
    )
    if s.r.random() < 0.7:
        _describe_place(s)
    if s.r.random() < 0.4:
        s.say(*WEATHER)
    if s.r.random() < 0.2:
        s.say(
            "On the way, {name} saw {a_color2} bird singing in a tree.",
            "On the way, {he} waved to a friendly neighbor.",
            "{Name} skipped and sang a little song as {he} walked.",
        )


_MEET_FRIEND: tuple[Step, ...] = (
    (
        "At the {place}, {name} saw {his} friend {fname}.",
        "There, {name} met {a_ftrait} {fkind} named {fname}.",
        "{Name} played with {his} friend {fname}.",
    ),
    (
        '"Hi, {fname}!" said {name}. "Do you want to play with me?"',
        '"Hello, {name}!" said {fname}. "Let\'s play together!"',
        '{Fname} smiled and said, "Hello, {name}! I am so happy to see you."',
    ),
)


_P_LOST: tuple[Step, ...] = (
    _setting,
    (
        "{He} played with {his} {obj} all {time}.",
        "{He} brought {his} {color} {obj} to play with.",
    ),
    PARAGRAPH,
    (
        "When it was time to go home, {name} could not find {his} {obj}.",
        "{Connect_but} {name} looked down and {his} {obj} was gone!",
        "{Connect_but} {name} saw that {his} {obj} was not there anymore.",
    ),
    (
        "{Name} felt {sad}.",
        "{He} was very {sad} and started to cry.",
        '"Oh no! Where is my {obj}?" cried {name}.',
    ),
    (
        '{His} {elder} said, "Don\'t worry, {name}. We will look for it together."',
        '{Fname} said, "I will help you find it, {name}!"',
        '"Let\'s look for it," said {his} {elder}.',
    ),
    (
        "They looked under the bench and behind the bushes.",
        "They looked everywhere, high and low.",
        "They searched near the {spot} and by the big rock.",
    ),
    PARAGRAPH,
    (
        "{Connect_end}, {finder} found the {obj} under a pile of leaves.",
        "{Connect_end}, {finder} saw something {color} near the {spot}. It was the {obj}!",
        "{Connect_end}, a little dog came running with the {obj} in its mouth.",
    ),
    (
        '"Thank you!" said {name}, and {he} gave the {obj} a big hug.',
        "{Name} was so {happy}. {He} held {his} {obj} tight.",
        '"My {obj}!" shouted {name}. {He} was very {happy}.',
    ),
)


_P_STUCK: tuple[Step, ...] = (
    _setting,
    (
        "{Name} played with {his} {obj}. It went up and up.",
        "{Name} threw {his} {obj} high into the air.",
        "The wind was strong, and it pulled {name}'s {obj} away.",
    ),
    PARAGRAPH,
    (
        "{Connect_but} the {obj} got stuck on the {spot}!",
        "Oh no! The {obj} landed on top of the {spot} and got stuck.",
    ),
    (
        "{Name} jumped and jumped, but {he} could not reach it.",
        "{Name} tried to reach it, but {he} was too small.",
        "{Name} stretched {his} arms, but the {obj} was too high.",
    ),
    (
        '"What can I do?" said {name}. {He} felt {sad}.',
        '"My {obj} is stuck!" cried {name}.',
    ),
    (
        "{Fname} came over to help.",
        "Just then, {fname} walked by.",
        "{His} friend {fname} saw what happened.",
    ),
    (
        '"I have an idea," said {fname}. "Let\'s use a long stick."',
        '"Let\'s ask {name}\'s {elder} for help," said {fname}.',
        '"Climb on my back," said {fname}. "Then you can reach it."',
    ),
    PARAGRAPH,
    (
        "{Connect_then}, they worked together, and the {obj} came down.",
        "{Connect_then}, {his} {elder} came with a ladder and got the {obj} down.",
        "They tried and tried, and at last the {obj} fell into {name}'s hands.",
    ),
    (
        '"Thank you, {fname}!" said {name}. "You are a good friend."',
        "{Name} and {fname} laughed and played together until the sun went down.",
        "{Name} was {happy}. {He} gave {fname} a big hug.",
    ),
)


_P_BROKEN: tuple[Step, ...] = (
    _setting,
    (
        "{Name} and {his} friend {fname} were playing with {name}'s {obj}.",
        "{His} friend {fname} came over and wanted to play with {name}'s {obj}.",
    ),
    PARAGRAPH,
    (
        "{Connect_but} {fname} dropped the {obj} and it broke.",
        "{Connect_but} the {obj} fell down and broke into pieces.",
        "{Connect_but} {fname} pushed too hard and the {obj} broke.",
    ),
    (
        "{Name} was {angry}.",
        '"You broke my {obj}!" shouted {name}. {He} was very {angry}.',
        "{Name} felt {sad} and a tear rolled down {his} face.",
    ),
    (
        '{Fname} looked down and said, "I am sorry, {name}. I did not mean to."',
        '"I\'m sorry," said {fname}. "Can I help you fix it?"',
    ),
    (
        "{Name} took a deep breath. {He} knew {fname} was sorry.",
        '{Name} thought for a moment and said, "It is okay. Let\'s fix it together."',
    ),
    PARAGRAPH,
    (
        "{Connect_then}, they got some glue and fixed the {obj}.",
        "{His} {elder} helped them, and soon the {obj} looked as good as new.",
        "They worked hard, and {connect_end_l} the {obj} was fixed.",
    ),
    (
        "{Name} and {fname} smiled. They were friends again.",
        '"We did it!" said {fname}. {Name} laughed and clapped {his} hands.',
    ),
)


_P_FEAR: tuple[Step, ...] = (
    (
        "{Name} was afraid of {fear}.",
        "There was one thing {name} did not like: {fear}.",
        "{Name} was brave, but {he} was scared of {fear}.",
    ),
    (
        "Every time {name} thought about it, {his} tummy felt funny.",
        "{He} did not want anyone to know.",
        "{He} always hid behind {his} {elder} when {he} saw it.",
    ),
    PARAGRAPH,
    ("{fear_event}",),  # the moment the fear comes true, written in make_story
    (
        "{Name} felt very {scared}. {He} wanted to run away.",
        '"Help!" cried {name}. {He} was so {scared}.',
        "{Name} closed {his} eyes and held {his} {obj} tight.",
    ),
    (
        '{His} {elder} held {his} hand and said, "It is okay to be scared. I am here with you."',
        '{His} {elder} smiled and said, "Let\'s be brave together, {name}."',
        '"Take a deep breath," said {his} {elder}. "You are braver than you think."',
    ),
    PARAGRAPH,
    (
        "{Name} took a deep breath and opened {his} eyes.",
        "{Name} counted to three and looked again.",
    ),
    (
        "It was not so bad after all.",
        "{He} saw that there was nothing to be afraid of.",
        "{He} felt a little bit braver.",
    ),
    (
        '"I did it!" said {name}. {He} felt {proud}.',
        "{Name} smiled. {He} was very {proud} of {himself}.",
    ),
)


_P_SHARE: tuple[Step, ...] = (
    _setting,
    *_MEET_FRIEND,
    PARAGRAPH,
    (
        "{Fname} saw {name}'s {obj} and wanted to play with it too.",
        '{Fname} asked, "Can I play with your {obj}, please?"',
    ),
    (
        '"No!" said {name}. "It is mine!"',
        "{Name} held the {obj} close and said, \"No, I want to play with it alone.\"",
    ),
    (
        "{Fname} felt {fsad} and walked away.",
        "{Fname} looked {fsad}. {Fhe} sat down all alone.",
    ),
    PARAGRAPH,
    (
        "Soon, {name} did not have fun anymore. Playing alone was boring.",
        "{Name} looked at {fname} and felt bad inside.",
        "{Name} thought about how {fname} must feel.",
    ),
    (
        '{Name} walked to {fname} and said, "I am sorry. Do you want to play with my {obj}?"',
        '{Name} went to {fname} and said, "Here, we can share my {obj}."',
    ),
    (
        '{Fname} smiled. "Thank you, {name}!" {fhe} said.',
        "{Fname} was so {fhappy}. {Fhe} gave {name} a big hug.",
    ),
    (
        "They played with the {obj} together all {time}, and they had lots of fun.",
        "They took turns, and the game was much more fun with two.",
    ),
)


_P_ANIMAL: tuple[Step, ...] = (
    _setting,
    PARAGRAPH,
    (
        "{Connect_but} {name} heard a small sound. It was a little {animal}.",
        "Near a tree, {name} found a little {animal}.",
        "{Connect_but} {name} saw a little {animal} sitting all alone.",
    ),
    (
        "The {animal} had a hurt leg and could not walk.",
        "The {animal} was lost and looked very {scared}.",
        "The {animal} was cold and hungry.",
    ),
    (
        '"Poor little {animal}," said {name}. "I will help you."',
        '"Don\'t be scared," said {name} softly. "I am your friend."',
    ),
    (
        "{Name} gave the {animal} some water and a piece of {his} {food}.",
        "{Name} wrapped the {animal} in a soft blanket.",
        "{Name} carried the {animal} to {his} {elder}.",
    ),
    (
        "{His} {elder} helped {him} take care of it.",
        '{His} {elder} said, "You are very kind, {name}."',
    ),
    PARAGRAPH,
    (
        "After a few days, the {animal} was strong again.",
        "Soon the {animal} felt much better.",
    ),
    (
        "{Name} let the {animal} go, and it looked back as if to say thank you.",
        "The {animal} jumped up and down. It was happy and so was {name}.",
        "The {animal} found its family, and {name} waved goodbye.",
    ),
)


_P_SKILL: tuple[Step, ...] = (
    (
        "{Name} wanted to learn to {skill}.",
        "More than anything, {name} wished {he} could {skill}.",
    ),
    (
        "{His} friend {fname} could already {skill}, and {name} wanted to do it too.",
        "It looked easy when {his} {elder} did it.",
    ),
    PARAGRAPH,
    (
        "The first time {name} tried, {he} {skill_fail}.",
        "{Name} tried very hard, but {he} {skill_fail}.",
    ),
    (
        '"I can\'t do it!" said {name}. {He} felt {sad}.',
        "{Name} wanted to give up. {He} was {sad}.",
    ),
    (
        '{His} {elder} said, "Everyone falls at first. Try again, {name}."',
        '"Don\'t give up," said {fname}. "You can do it!"',
        '{His} {elder} hugged {him} and said, "Let\'s practice a little every day."',
    ),
    PARAGRAPH,
    (
        "So {name} practiced every day.",
        "{Name} tried again and again.",
        "{Name} did not give up. {He} practiced all week.",
    ),
    (
        "{Connect_end}, {name} {skill_win}!",
        "One {time}, {name} {skill_win}.",
    ),
    (
        '"I did it!" shouted {name}. {He} was so {proud}.',
        "Everyone clapped. {Name} felt very {proud}.",
    ),
)


_P_CONTEST: tuple[Step, ...] = (
    (
        "One {time}, there was {contest} at the {place}.",
        "{Name} and {his} friends had {contest} at the {place}.",
    ),
    (
        "{Name} wanted to win very much.",
        '"I will win!" said {name}. "I am the best!"',
    ),
    PARAGRAPH,
    (
        "{Name} tried {his} best, but {fname} won.",
        "{Connect_but} {fname} won, and {name} came last.",
    ),
    (
        "{Name} felt {sad}. {He} wanted to cry.",
        "{Name} was {angry}. {He} stamped {his} feet.",
    ),
    (
        '{His} {elder} said, "You did your best, and that is what matters."',
        '{Fname} came over and said, "You were great too, {name}! Let\'s play again."',
    ),
    PARAGRAPH,
    (
        "{Name} thought about it and smiled.",
        "{Name} felt better.",
    ),
    (
        '"Good job, {fname}!" said {name}. "You won fair and square."',
        "{Name} hugged {fname} and said, \"Well done!\"",
    ),
    (
        "Then they played again just for fun, and they laughed and laughed.",
        "They all ate {foods} together and had a wonderful time.",
    ),
)


_P_RAIN: tuple[Step, ...] = (
    (
        "{Name} and {his} {elder} planned a picnic at the {place}.",
        "{Name} wanted to go to the {place} to {like}.",
    ),
    (
        "{He} packed {foods} and {his} {obj} in a basket.",
        "{Name} was so {happy}. {He} could not wait.",
    ),
    PARAGRAPH,
    (
        "{Connect_but} dark clouds came, and it started to rain.",
        "{Connect_but} the sky turned gray and big raindrops fell.",
    ),
    (
        '"Oh no!" said {name}. "Now we can\'t go to the {place}."',
        "{Name} looked out of the window and felt {sad}.",
    ),
    (
        '{His} {elder} smiled and said, "We can have a picnic inside!"',
        '{His} {elder} said, "I know! Let\'s build a fort in the living room."',
    ),
    PARAGRAPH,
    (
        "They put a blanket on the floor and ate their {foods}.",
        "They made a fort with pillows and blankets and ate {foods} inside it.",
    ),
    (
        "They told stories and listened to the rain.",
        "They sang songs and played games until the rain stopped.",
    ),
    (
        '"This is the best picnic ever!" said {name}.',
        "{Name} laughed. It was even more fun than the {place}.",
    ),
)


_P_LOST_WAY: tuple[Step, ...] = (
    (
        "One {time}, {name} went to the {place} with {his} {elder}.",
        "{Name} and {his} {elder} went to the busy {place}.",
    ),
    _describe_place,
    PARAGRAPH,
    (
        "{Name} saw {a_color} butterfly and ran after it.",
        "{Name} saw a shiny {obj} and walked away to look at it.",
    ),
    (
        "When {he} looked up, {his} {elder} was gone!",
        "{Connect_but} {name} looked around and could not see {his} {elder}.",
    ),
    (
        "{Name} felt very {scared}.",
        '"Where are you?" cried {name}. {He} was {scared}.',
    ),
    (
        "Then {he} remembered what {his} {elder} said: stay in one place and ask for help.",
        "{Name} stopped, took a deep breath and looked for someone to help.",
    ),
    PARAGRAPH,
    (
        "{He} saw a kind lady at a shop and told the lady {his} name.",
        "{He} saw a police officer and said, \"I can't find my {elder}.\"",
    ),
    (
        "Soon, {his} {elder} came running.",
        "A few minutes later, {name} heard {his} {elder} call {his} name.",
    ),
    (
        '"{Name}! I was so worried!" said {his} {elder}, and gave {him} a big hug.',
        "{Name} ran to {his} {elder} and hugged {elder_him} tight.",
    ),
)


_P_LIE: tuple[Step, ...] = (
    (
        "{Name}'s {elder} baked a big {baked} for dinner.",
        "There was a plate of {bakeds} on the kitchen table.",
    ),
    (
        '{His} {elder} said, "Please don\'t eat them before dinner."',
        '"These are for later," said {his} {elder}.',
    ),
    PARAGRAPH,
    (
        "{Connect_but} {name} was hungry, and {he} ate one when no one was looking.",
        "{Name} could not wait. {He} took a big bite.",
    ),
    (
        'Later, {his} {elder} asked, "Who ate the {baked}?"',
        '{His} {elder} looked at the plate and asked, "{Name}, did you eat it?"',
    ),
    (
        '"It was not me," said {name}. "It was the {pet}!"',
        '"No," said {name}. But {his} face turned red.',
    ),
    (
        "{Name} felt bad inside. {His} tummy hurt, and {he} could not smile.",
        "All evening, {name} felt {sad}. The lie felt heavy.",
    ),
    PARAGRAPH,
    (
        'At bedtime, {name} said, "I am sorry. I ate it. I did not tell the truth."',
        '{Name} went to {his} {elder} and said, "It was me. I am sorry."',
    ),
    (
        '{His} {elder} hugged {him} and said, "Thank you for telling me the truth."',
        '{His} {elder} smiled and said, "I am proud of you for saying sorry."',
    ),
    (
        "{Name} felt light and {happy} again.",
        "The next day, they baked {bakeds} together.",
    ),
)


_P_GIFT: tuple[Step, ...] = (
    (
        "Tomorrow was {his} {elder}'s birthday.",
        "{Name} wanted to give {his} {elder} a special gift.",
    ),
    (
        "{Connect_but} {name} did not have any money.",
        "{He} looked in {his} piggy bank, but it was empty.",
    ),
    (
        '"What can I give?" {name} asked {his} friend {fname}.',
        "{Name} felt {sad}. {He} did not know what to do.",
    ),
    PARAGRAPH,
    (
        '{Fname} said, "You can make something! Gifts from the heart are the best."',
        "Then {name} had an idea.",
    ),
    (
        "{Name} drew a picture of {his} {elder} and colored it {color}.",
        "{Name} picked some flowers in the garden and made a pretty card.",
        "{Name} baked a little {baked} with {a_color} heart on top.",
    ),
    PARAGRAPH,
    (
        "When {his} {elder} saw the gift, {elder_he} smiled a big smile.",
        "{His} {elder} opened the gift and {elder_his} eyes filled with happy tears.",
    ),
    (
        '"This is the best gift ever," said {his} {elder}. "Thank you, {name}."',
        '"I love it," said {his} {elder}, and gave {name} a big hug.',
    ),
    ("{Name} felt warm and {happy} inside.", "{Name} was so {proud}."),
)


_P_NEW_FRIEND: tuple[Step, ...] = (
    (
        "{Name} and {his} family moved to a new house near the {place}.",
        "It was {name}'s first day at a new school.",
    ),
    (
        "{He} did not know anyone, and {he} felt {sad} and lonely.",
        "Everyone already had friends. {Name} felt shy and {sad}.",
    ),
    (
        '"Nobody wants to play with me," {name} said quietly.',
        '{Name} told {his} {elder}, "I miss my old friends."',
    ),
    (
        '{His} {elder} said, "Just smile and say hello. You will make a friend soon."',
        '{His} {elder} said, "Try to be brave, {name}. Someone may be lonely too."',
    ),
    PARAGRAPH,
    (
        "The next {time}, {name} saw {a_ftrait} {fkind} named {fname} sitting alone.",
        "At the {place}, {name} saw {fname}, who was playing alone with {a_color} {obj}.",
    ),
    (
        '{Name} walked over and said, "Hello! My name is {name}. Can I play too?"',
        '{Name} took a deep breath and said, "Hi! Do you want to be my friend?"',
    ),
    (
        '{Fname} smiled. "Yes! I was feeling lonely too," {fhe} said.',
        '"I would like that very much," said {fname} with a big smile.',
    ),
    PARAGRAPH,
    (
        "They played together all {time} and laughed a lot.",
        "Soon {name} and {fname} were the best of friends.",
    ),
)


_P_MESS: tuple[Step, ...] = (
    (
        "One {time}, {name} wanted to paint a picture in the kitchen.",
        "One {time}, {name} decided to bake {bakeds} all by {himself}.",
    ),
    (
        "{He} got out everything {he} needed and started to work.",
        "{He} was so excited that {he} did not wait for {his} {elder}.",
    ),
    PARAGRAPH,
    (
        "{Connect_but} {he} spilled everything on the floor!",
        "Soon there was a big mess on the floor, on the table and even on the {pet}.",
    ),
    (
        '"Oh no," said {name}. "What a mess!"',
        "{Name} looked at the mess and felt {scared}.",
    ),
    (
        "{He} wanted to hide, but {he} knew that was not right.",
        "{He} thought about running outside, but {he} stopped.",
    ),
    PARAGRAPH,
    (
        "{Name} got a cloth and began to clean.",
        "{Name} took a broom and a bucket of water.",
    ),
    (
        "When {his} {elder} came in, the kitchen was almost clean.",
        "{His} {elder} came to help, and they cleaned it up together.",
    ),
    (
        '{His} {elder} said, "Thank you for cleaning up, {name}. Next time, let\'s do it together."',
        '"You made a mess, but you fixed it," said {his} {elder}. "That is very grown-up."',
    ),
    ("{Name} smiled and felt {proud}.", "{Name} felt {happy} and a little bit grown-up."),
)


_P_SICK: tuple[Step, ...] = (
    (
        "One {time}, {name}'s friend {fname} was sick and had to stay in bed.",
        "One {time}, {fname} did not come to play. {Fhe} was sick.",
    ),
    (
        "{Name} missed {fname} very much.",
        "{Name} felt {sad}. Playing was not fun without {fname}.",
    ),
    (
        '"How can I help {fname} feel better?" {name} asked {his} {elder}.',
        "{Name} wanted to do something nice for {fhim}.",
    ),
    PARAGRAPH,
    (
        "{Name} made a card with a big {color} sun on it.",
        "{Name} and {his} {elder} made warm soup and brought it to {fname}'s house.",
        "{Name} picked {his} best {obj} to give to {fname}.",
    ),
    (
        "{Fname} smiled when {fhe} saw it.",
        '"Thank you, {name}," said {fname}. "You are so kind."',
    ),
    (
        "{Name} sat by the bed and read a story to {fname}.",
        "They talked and laughed, and {fname} felt a little better.",
    ),
    PARAGRAPH,
    (
        "A few days later, {fname} was well again.",
        "Soon {fname} was strong again and could come out to play.",
    ),
    (
        "The two friends ran to the {place} and played all {time}.",
        '"Thank you for helping me," said {fname}. "You are my best friend."',
    ),
)


# Plot name (also its key in MORALS) -> steps. The order is part of the output: make_story picks by index.
PROBLEMS: dict[str, tuple[Step, ...]] = {
    "lost": _P_LOST, "stuck": _P_STUCK, "broken": _P_BROKEN, "fear": _P_FEAR, "share": _P_SHARE, "animal": _P_ANIMAL,
    "skill": _P_SKILL, "contest": _P_CONTEST, "rain": _P_RAIN, "lost_way": _P_LOST_WAY, "lie": _P_LIE, "gift": _P_GIFT,
    "new_friend": _P_NEW_FRIEND, "mess": _P_MESS, "sick": _P_SICK,
}
FEELINGS = {
    "sad": ["sad", "upset", "unhappy", "sad"],
    "happy": ["happy", "glad", "happy", "joyful"],
    "angry": ["angry", "mad", "cross", "grumpy"],
    "scared": ["scared", "afraid", "frightened", "worried"],
    "proud": ["proud", "proud", "pleased"],
}
ENDINGS = [
    "{Name} went home with a big smile on {his} face.",
    "That night, {name} fell asleep with a smile.",
    "It was a very good day.",
    "{Name} and {fname} stayed best friends forever.",
    "And they all lived happily ever after.",
    "At dinner, {name} told {his} {elder} all about it.",
    "The sun went down, and everyone went home happy.",
]


@dataclass(frozen=True)
class StoryFacts:
    """What a story is about, as its generator chose it (llm.qa_task asks questions about these).
    hero: the main character's name; kind: "girl" | "boy" | "child" or the animal ("bunny", ...);
    friend: the friend's name (the story may not mention them: see friend_named); place: "park", ...;
    obj: the toy or thing of the plot ("kite", ...; some plots never mention it); problem: the plot's key
    in PROBLEMS ("lost", "stuck", ...)."""

    hero: str
    kind: str
    friend: str
    place: str
    obj: str
    problem: str
    friend_named: bool


def make_story(r: random.Random) -> str:
    """One story drawn from ``r``: intro, problem, resolution, moral."""
    return make_story_with_facts(r)[0]


def make_story_with_facts(r: random.Random) -> tuple[str, StoryFacts]:
    """make_story's text (the same draws from ``r``, so the same text) and the facts it was built from."""
    s = _Story(r)
    c = s.c
    if r.random() < 0.7:
        girl = r.random() < 0.5
        s.set_person("", s.pick(GIRLS if girl else BOYS), "she" if girl else "he")
        c["kind"] = s.pick(["girl", "girl", "child"] if girl else ["boy", "boy", "child"])
        friends = [n for n in (GIRLS + BOYS) if n != c["name"]]
        fname = s.pick(friends)
        s.set_person("f", fname, "she" if fname in GIRLS else "he")
        c["fkind"] = "girl" if fname in GIRLS else "boy"
    else:
        kind, name, pron = s.pick(ANIMALS)
        s.set_person("", name, pron)
        c["kind"] = kind
        fkind, fname, fpron = s.pick([a for a in ANIMALS if a[1] != name])
        s.set_person("f", fname, fpron)
        c["fkind"] = fkind
    trait = s.pick(TRAITS)
    c["a_trait"] = _a(trait)
    c["a_ftrait"] = _a(s.pick(TRAITS))
    elder, elder_pron = s.pick(ELDERS)
    c["elder"] = elder
    c["elder_he"], c["elder_him"], c["elder_his"] = (PRONOUNS[elder_pron][k] for k in ("he", "him", "his"))
    c["time"] = s.pick(TIMES)
    c["time0"] = s.pick(["morning", "spring morning", "summer morning", "sunny morning"])
    c["place"] = s.pick(list(PLACES))
    c["like"] = s.pick(LIKES)
    c["color"] = s.pick(COLORS)
    c["a_color"] = _a(c["color"])
    c["a_color2"] = _a(s.pick(["red", "blue", "yellow", "little", "tiny", "orange", "brown"]))
    c["food"], c["foods"] = s.pick(FOODS)
    c["baked"], c["bakeds"] = s.pick(BAKED)
    c["animal"] = s.pick([a[0] for a in ANIMALS])
    c["pet"] = s.pick(["cat", "dog", "puppy", "kitten"])
    for key, words in FEELINGS.items():
        c[key] = s.pick(words)
        c["f" + key] = s.pick(words)
    c["Connect_then"] = s.pick(CONNECT_THEN)
    c["Connect_but"] = s.pick(CONNECT_BUT)
    c["Connect_end"] = s.pick(CONNECT_END)
    c["connect_end_l"] = c["Connect_end"].lower()
    c["finder"] = s.pick([c["name"], c["fname"], "{}'s {}".format(c["name"], elder)])
    fear, event = s.pick(FEARS)
    c["fear"], c["fear_event"] = fear, event.format(**c)
    skill, fail, win = s.pick(SKILLS)
    c["skill"], c["skill_fail"], c["skill_win"] = skill, fail, win
    c["contest"] = s.pick(CONTESTS)

    problem = s.pick(list(PROBLEMS))
    if problem == "stuck":
        c["obj"], c["spot"] = s.pick(STUCK)
    elif problem == "broken":
        c["obj"] = s.pick(BREAKABLE)
        c["spot"] = "table"
    else:
        c["obj"] = s.pick(LOSABLE if problem == "lost" else TOYS)
        c["spot"] = s.pick(["tree", "bench", "swings", "slide", "gate", "flowers", "pond"])
    c["a_color"] = _a(c["color"])

    _intro(s)
    if problem not in ("fear", "skill", "lie", "gift", "new_friend", "sick") and r.random() < 0.3:
        s.say("{Name} had a friend named {fname}.", "{Name}'s best friend was {fname}.")
    s.new_paragraph()
    _tell(s, PROBLEMS[problem])
    s.new_paragraph()
    if r.random() < 0.5:
        s.say(*[e for e in ENDINGS if s.friend_seen or "fname" not in e])
    s.say(*MORALS[problem])
    facts = StoryFacts(hero=c["name"], kind=c["kind"], friend=c["fname"], place=c["place"], obj=c["obj"],
                       problem=problem, friend_named=s.friend_seen)
    return s.text(), facts


# ----------------------------------------------------------------------------- corpus


_WORD = re.compile(r"[A-Za-z']+")


def generate_stories(out_path: str | os.PathLike, size_mb: float = 5.0, seed: int = 0, progress: bool = True) -> dict:
    """Write stories until the file holds ``size_mb`` * 10**6 bytes (UTF-8); return statistics.

    The write is atomic (temp file + ``os.replace``): an interrupted run leaves no partial corpus.
    Returns ``{"path", "bytes", "chars", "stories", "distinct_words", "words", "seed", "size_mb",
    "generator_version", "seconds"}``.
    """
    if not size_mb > 0:
        raise ValueError(f"size_mb must be > 0, got {size_mb}")
    if size_mb > MAX_SIZE_MB:
        raise ValueError(f"size_mb must be at most {MAX_SIZE_MB:,} (a demo corpus), got {size_mb:g}")
    out = Path(out_path)
    check_writable(out, what="out", is_dir=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = int(size_mb * 1_000_000)
    free = shutil.disk_usage(out.parent).free
    if target > free:
        raise ValueError(f"size_mb {size_mb:g}: {target / 1e6:,.0f} MB needed but only {free / 1e6:,.0f} MB free "
                         f"in {out.parent}")
    r = random.Random(seed)
    t0 = time.perf_counter()
    n_bytes = n_chars = n_stories = n_words = 0
    words: set[str] = set()
    last_report = t0
    with replacing(out) as tmp, open(tmp, "x", encoding="utf-8", newline="\n") as f:
        while n_bytes < target:
            block = make_story(r) + "\n" + EOT + "\n"
            f.write(block)
            n_bytes += len(block.encode("utf-8"))
            n_chars += len(block)
            n_stories += 1
            ws = _WORD.findall(block[: -len(EOT) - 2].lower())
            n_words += len(ws)
            words.update(ws)
            now = time.perf_counter()
            if progress and now - last_report > 1.0:
                last_report = now
                frac = n_bytes / target
                eta = (now - t0) * (1 - frac) / max(frac, 1e-9)
                print(f"\rgenerate: {n_bytes / 1e6:.1f}/{target / 1e6:.1f} MB  ETA {eta:.0f}s", end="", file=sys.stderr, flush=True)
    if progress and time.perf_counter() - t0 > 1.0:
        print(file=sys.stderr, flush=True)
    return {
        "path": str(out),
        "bytes": n_bytes,
        "chars": n_chars,
        "stories": n_stories,
        "words": n_words,
        "distinct_words": len(words),
        "seed": seed,
        "size_mb": size_mb,
        "generator_version": GENERATOR_VERSION,
        "seconds": round(time.perf_counter() - t0, 3),
    }
