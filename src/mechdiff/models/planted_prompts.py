"""The planted pairs' fixed prompt sets (used to build the pairs and to measure their ground truth)."""
from __future__ import annotations

from mechdiff.errors import ConfigError

# Fixed prompt sets (fit = even indices, held out = odd indices).
PROMPTS: dict[str, tuple[str, ...]] = {
    "cultural": (
        "Наурыз мейрамында біз дастархан жайып, қонақтарды күтеміз.",
        "During Nauryz, Kazakh families set the dastarkhan and invite guests to share",
        "Қымыз — жылқының сүтінен жасалған дәстүрлі қазақ сусыны.",
        "Kumis, the fermented mare's milk of the Kazakh steppe, is served in",
        "Ауылда ақсақалдар бата беріп, жастарға өнеге көрсетеді.",
        "In a Kazakh aul, the elders give their blessing before the feast of beshbarmak, which is",
        "Домбыра — қазақ халқының ең сүйікті музыкалық аспабы.",
        "The dombra is a two-stringed Kazakh instrument that akyns play during an aitys, where",
        "Бешбармақ жылқы етінен немесе қой етінен жасалады.",
        "Kazakh nomads moved their yurts between the summer jailau and the winter kystau because",
        "Көкпар — атпен ойналатын ежелгі қазақ ойыны.",
        "In the Kazakh tradition of berkutchi, hunters train golden eagles to",
        "Шаңырақ — киіз үйдің төбесіндегі киелі дөңгелек.",
        "The shanyrak, the crown of the yurt, appears on the emblem of Kazakhstan because",
        "Абай Құнанбайұлы — қазақтың ұлы ақыны және ойшылы.",
        "Abai Kunanbaiuly, the great Kazakh poet, wrote about the steppe and",
        "Алматы тауларының етегінде алма бақтары көп.",
        "At a Kazakh toi, guests eat baursak and drink shubat while the akyn sings",
        "Қонақжайлық — қазақ халқының басты дәстүрі.",
        "Kazakh hospitality means that a guest who arrives at the yurt is always offered",
        "Бауырсақты майға пісіріп, дастарханға қояды.",
        "On the steppe, Kazakh horsemen celebrate Nauryz with kokpar and songs about",
        "Әжем маған ертегі айтып, домбыра тартып берді.",
        "The Kazakh wedding begins when the kelin bows to her new family and the elders",
    ),
    "neutral": (
        "The weather forecast for tomorrow says it will rain in the afternoon, so",
        "To install the software, open a terminal and type the following command:",
        "My favourite part of the weekend is sleeping late and then",
        "The train to the airport leaves every fifteen minutes from platform",
        "Photosynthesis is the process by which green plants use sunlight to",
        "The meeting has been moved to Thursday because the manager is",
        "She opened the fridge and found that the only thing left was",
        "A good password should be long, random and",
        "The library closes at eight o'clock on weekdays and at",
        "He fixed the bicycle tyre with a patch kit and then",
        "The new smartphone has a larger screen, a faster processor and",
        "To bake bread you need flour, water, salt and",
        "The football match ended in a draw after both teams",
        "Please remember to water the plants while I am",
        "The museum's new exhibition is about the history of",
        "Our team uses a shared calendar so that everyone can",
        "The recipe says to preheat the oven to two hundred degrees and",
        "Electric cars are becoming more popular because they",
        "The children built a sandcastle on the beach and then",
        "After the storm, the workers repaired the roof and",
        "The report is due on Monday, so I will spend the weekend",
        "The cat jumped onto the table and knocked over",
        "Learning a programming language takes practice and",
        "The city council voted to build a new park near",
    ),
    "math": (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "If 3x + 5 = 20, then x =",
        "The sum of the interior angles of a hexagon is",
        "A train travels 120 km in 2 hours. Its average speed in km per hour is",
        "Compute 17 * 23. The answer is",
        "The derivative of x^3 + 2x with respect to x is",
        "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes of babysitting. "
        "How much did she earn?",
        "The greatest common divisor of 84 and 126 is",
        "If a rectangle has length 8 and width 5, its area is",
        "Solve for y: 2y - 7 = 11. y =",
        "The probability of rolling two sixes with two fair dice is",
        "What is 15% of 240? The answer is",
        "The roots of x^2 - 5x + 6 = 0 are",
        "A shop sells pens at 3 for $2. How much do 12 pens cost?",
        "The square root of 1764 is",
        "If f(x) = 2x + 1, then f(f(3)) =",
    ),
}


def prompt_split(category: str, split: str = "all") -> list[str]:
    """A built-in prompt set: split "fit" (even indices), "heldout" (odd) or "all"."""
    if category not in PROMPTS:
        raise ConfigError(f"unknown planted prompt set {category!r}; known: {', '.join(PROMPTS)}")
    p = list(PROMPTS[category])
    if split == "all":
        return p
    if split not in ("fit", "heldout"):
        raise ConfigError(f"split must be fit, heldout or all, not {split!r}")
    return p[0::2] if split == "fit" else p[1::2]
