"""A fixed pool of common English words for the project's own task generators.

The pool is split by position into disjoint train / valid / eval parts, so held-out instances of
word tasks never reuse a training word.
"""

from __future__ import annotations

WORDS = """
apple table river garden window pencil basket candle doctor engine forest guitar hammer island jacket
kitten ladder marble napkin orange pepper rabbit saddle tiger umbrella violin wallet yellow zebra anchor
bottle carpet dragon eagle feather ginger helmet insect jungle kettle lemon mirror needle oyster parrot
pocket rocket silver tomato turtle valley wagon blanket button camera cherry cloud copper cotton desert
dinner donkey drawer falcon farmer finger flower fossil frozen glove goose harbor honey jelly kernel
lantern letter lizard magnet meadow melon monkey muffin object onion paddle pebble pillow planet puzzle
quartz ribbon saddle salmon shadow shovel singer spider sponge spoon stone sugar summer sunset supper
tablet teacher ticket timber tunnel velvet walnut winter wizard yogurt badge bamboo banner barrel beacon
beetle branch bridge bucket cabin cactus castle cattle cement circle closet coffee comet cookie corner
cradle crayon dancer dentist diamond elbow fabric fiddle garlic goblet gravel hollow iron jigsaw keyboard
knight leather lobster mitten motor mustard noodle orchid otter paper peanut piano pirate plank pumpkin
puppet radish raven robot sailor scarf seed sheep shield shirt socket soldier spark spring squirrel
stable statue stove sweater thunder tulip vessel village wheel whistle willow window wolf wool
""".split()
# keep the first occurrence of each word
WORDS = list(dict.fromkeys(WORDS))


def word_pool(split: str) -> list[str]:
    """Disjoint word pools: train (3/5 of the words), valid (1/5), eval (1/5)."""
    if split == "train":
        return [w for i, w in enumerate(WORDS) if i % 5 < 3]
    if split == "valid":
        return [w for i, w in enumerate(WORDS) if i % 5 == 3]
    if split == "eval":
        return [w for i, w in enumerate(WORDS) if i % 5 == 4]
    raise ValueError(f"unknown split {split!r}")
