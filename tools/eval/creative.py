"""Open-ended creative prompts with long answers: where parallel samples should differ in idea.

Our own prompts (no package ships a small, permissively licensed set that asks for many
different ideas), each short enough for a CPU prefill and open enough that n samples of one
prompt can go in n directions. Scored like writing: semantic spread across the group (Vendi,
k-means clusters, mean cosine), distinct-n, and perplexity under the base model.
"""

from __future__ import annotations

PROMPTS = [
    "Invent a new holiday and describe how people celebrate it.",
    "Write the opening of a story that begins with a knock on the door at midnight.",
    "Describe a city that exists entirely underwater.",
    "Propose an unusual use for an old bicycle.",
    "Write a short fable with a moral about patience.",
    "Describe a meal cooked by a robot chef for the first time.",
    "Imagine a world where people can trade memories. Describe one trade.",
    "Write a letter from a lighthouse keeper to someone far away.",
    "Describe a sport that could only be played on the Moon.",
    "Tell the story of a lost umbrella from the umbrella's point of view.",
    "Invent a creature that lives in clouds and describe its day.",
    "Write the first page of a mystery set in a library.",
    "Describe a museum dedicated to a very ordinary object.",
    "Imagine a conversation between the sun and the moon.",
    "Write a short story about a child who finds a map in a book.",
    "Describe a new musical instrument and the sound it makes.",
    "Invent a small village custom and explain where it came from.",
    "Write about a journey on a train that never stops.",
    "Describe a garden that grows something other than plants.",
    "Tell a story about a friendship between a cat and a crow.",
    "Imagine you wake up able to speak to machines. What happens first?",
    "Describe a festival held in the middle of winter in a desert town.",
    "Write a short myth explaining why the sea is salty.",
    "Describe an invention that would make mornings easier.",
    "Write a story in which the weather has feelings.",
    "Describe a shop that sells things that cannot be bought anywhere else.",
    "Imagine the last bookstore on Earth. Describe a day there.",
    "Write about a painter who can only paint what will happen tomorrow.",
    "Describe a house that changes its rooms every night.",
    "Tell the story of a message in a bottle and who finds it.",
    "Invent a board game and explain how to win it.",
    "Describe a school for dragons.",
    "Write a story about an old clock that starts running backwards.",
    "Imagine a world without colour, and the day colour returns.",
    "Describe a bridge between two islands and the people who cross it.",
    "Write a short tale about a baker who bakes dreams into bread.",
]


def prompts() -> list[dict]:
    """Rows shaped like the writing rows: `index`, `domain2` and `query`."""
    return [{"index": i, "domain2": "creative", "query": text} for i, text in enumerate(PROMPTS)]
