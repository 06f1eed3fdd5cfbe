"""The multiple-choice set (mc.jsonl) for make_sets.py: questions written for this project, the
choices shuffled with a fixed seed. Schema: {"id", "question", "choices": [...], "answer": int,
"lang", "category"}."""
from __future__ import annotations

import random

# (key, lang, category, question, choices, answer index before shuffling)
MC = [
    ("gold", "en", "general", "What is the chemical symbol for gold?", ["Au", "Ag", "Gd", "Go"], 0),
    ("red_planet", "en", "general", "Which planet is known as the Red Planet?", ["Venus", "Mars", "Jupiter", "Mercury"], 1),
    ("boil", "en", "general", "At sea level, water boils at how many degrees Celsius?", ["90", "100", "110", "120"], 1),
    ("photosynthesis", "en", "general", "Which gas do plants take in for photosynthesis?", ["Oxygen", "Nitrogen", "Carbon dioxide", "Helium"], 2),
    ("hexagon", "en", "general", "How many sides does a hexagon have?", ["5", "6", "7", "8"], 1),
    ("12x12", "en", "general", "What is 12 times 12?", ["124", "144", "142", "122"], 1),
    ("ocean", "en", "general", "Which is the largest ocean on Earth?", ["Atlantic", "Indian", "Arctic", "Pacific"], 3),
    ("romeo", "en", "general", "Who wrote Romeo and Juliet?", ["Charles Dickens", "William Shakespeare", "Leo Tolstoy", "Jane Austen"], 1),
    ("japan", "en", "general", "What is the capital of Japan?", ["Kyoto", "Osaka", "Tokyo", "Nagoya"], 2),
    ("sqrt81", "en", "general", "What is the square root of 81?", ["7", "8", "9", "10"], 2),
    ("heart", "en", "general", "Which organ pumps blood around the body?", ["Liver", "Heart", "Lungs", "Kidney"], 1),
    ("freeze_f", "en", "general", "At what temperature in Fahrenheit does water freeze?", ["0", "32", "100", "212"], 1),
    ("leap", "en", "general", "How many days are in a leap year?", ["364", "365", "366", "367"], 2),
    ("largest_planet", "en", "general", "What is the largest planet in the Solar System?", ["Earth", "Saturn", "Jupiter", "Neptune"], 2),
    ("hydrogen", "en", "general", "Which element has atomic number 1?", ["Helium", "Hydrogen", "Oxygen", "Carbon"], 1),
    ("nile", "en", "general", "What is the longest river in Africa?", ["Congo", "Niger", "Nile", "Zambezi"], 2),
    ("mona_lisa", "en", "general", "Who painted the Mona Lisa?", ["Michelangelo", "Leonardo da Vinci", "Raphael", "Rembrandt"], 1),
    ("7x8", "en", "general", "What is 7 times 8?", ["54", "56", "58", "64"], 1),
    ("light", "en", "general", "Roughly how fast does light travel in a vacuum?", ["300,000 km per second", "30,000 km per second", "3,000 km per second", "300 km per second"], 0),
    ("piano", "en", "general", "Which instrument usually has 88 keys?", ["Guitar", "Piano", "Violin", "Flute"], 1),
    ("water", "en", "general", "What is the common name of H2O?", ["Salt", "Water", "Ammonia", "Sugar"], 1),
    ("bones", "en", "general", "How many bones does an adult human skeleton usually have?", ["186", "206", "226", "256"], 1),
    ("liberty", "en", "general", "Which country gave the Statue of Liberty to the United States?", ["United Kingdom", "France", "Spain", "Italy"], 1),
    ("triangle", "en", "general", "What is the sum of the angles of a triangle in degrees?", ["90", "180", "270", "360"], 1),
    ("mercury", "ru", "general", "Какая планета ближе всего к Солнцу?", ["Венера", "Меркурий", "Марс", "Земля"], 1),
    ("right_angle", "ru", "general", "Сколько градусов в прямом угле?", ["45", "90", "180", "360"], 1),
    ("war_peace", "ru", "general", "Кто написал роман «Война и мир»?", ["Достоевский", "Толстой", "Чехов", "Пушкин"], 1),
    ("paris", "ru", "general", "Какой город является столицей Франции?", ["Лион", "Марсель", "Париж", "Ницца"], 2),
    ("jupiter_kk", "kk", "general", "Күн жүйесіндегі ең үлкен планета қайсы?", ["Марс", "Юпитер", "Жер", "Шолпан"], 1),
    ("week_kk", "kk", "general", "Бір аптада неше күн бар?", ["5", "6", "7", "8"], 2),
    ("boil_kk", "kk", "general", "Теңіз деңгейінде су неше градуста қайнайды?", ["50°C", "100°C", "150°C", "200°C"], 1),
    ("heart_kk", "kk", "general", "Адам ағзасында қанды қай мүше айдайды?", ["Бауыр", "Жүрек", "Өкпе", "Бүйрек"], 1),
    # Kazakh culture
    ("capital", "en", "kazakh_culture", "What is the capital of Kazakhstan?", ["Almaty", "Astana", "Shymkent", "Karaganda"], 1),
    ("kumys", "en", "kazakh_culture", "Kumys is traditionally made from which milk?", ["Cow's milk", "Mare's milk", "Camel's milk", "Goat's milk"], 1),
    ("shubat", "en", "kazakh_culture", "Shubat is fermented milk of which animal?", ["Horse", "Camel", "Sheep", "Cow"], 1),
    ("dombra_strings", "en", "kazakh_culture", "How many strings does a traditional dombra usually have?", ["Two", "Four", "Six", "Twelve"], 0),
    ("nauryz_date", "en", "kazakh_culture", "Around which date is Nauryz celebrated in Kazakhstan?", ["1 January", "22 March", "16 December", "1 May"], 1),
    ("abai", "en", "kazakh_culture", "Who wrote the Book of Words (Qara sozder)?", ["Abai Kunanbayuly", "Mukhtar Auezov", "Shokan Valikhanov", "Ybyrai Altynsarin"], 0),
    ("yurt", "en", "kazakh_culture", "What is the traditional portable dwelling of Kazakh herders?", ["The yurt", "The igloo", "The longhouse", "The hut on stilts"], 0),
    ("kokpar", "en", "kazakh_culture", "Kokpar is a traditional game played mainly on what?", ["Horseback", "Ice skates", "Boats", "Foot"], 0),
    ("beshbarmak", "en", "kazakh_culture", "What is beshbarmak mainly made of?", ["Boiled meat and flat noodles", "Rice and fish", "Fried dough with honey", "Vegetable soup"], 0),
    ("independence", "en", "kazakh_culture", "On which date is Kazakhstan's Independence Day?", ["16 December", "22 March", "6 July", "30 August"], 0),
    ("kobyz", "en", "kazakh_culture", "Which Kazakh instrument is bowed and linked to the legend of Korkyt?", ["Kobyz", "Dombra", "Sybyzgy", "Zhetygen"], 0),
    ("aitys", "en", "kazakh_culture", "Aitys is a contest between whom?", ["Improvising poets", "Wrestlers", "Horse riders", "Archers"], 0),
    ("shanyrak", "en", "kazakh_culture", "What is a shanyrak?", ["The round crown at the top of a yurt", "A type of bread", "A wedding song", "A breed of horse"], 0),
    ("saukele", "en", "kazakh_culture", "What is the name of the tall traditional headdress of a Kazakh bride?", ["Saukele", "Shapan", "Tymak", "Kebis"], 0),
    ("tenge", "en", "kazakh_culture", "What is the currency of Kazakhstan?", ["Ruble", "Som", "Tenge", "Manat"], 2),
    ("baursak", "en", "kazakh_culture", "What is baursak?", ["Pieces of fried dough", "A horse-meat sausage", "A dried cheese", "A fermented drink"], 0),
    ("kyz_kuu", "ru", "kazakh_culture", "Что такое «кыз куу»?", ["Конная игра", "Свадебная песня", "Вид войлока", "Блюдо из мяса"], 0),
    ("asar", "ru", "kazakh_culture", "Что такое «асар»?", ["Коллективная взаимопомощь", "Праздничное блюдо", "Музыкальный инструмент", "Часть юрты"], 0),
    ("tusau", "ru", "kazakh_culture", "Как называется обряд разрезания пут у ребёнка, который учится ходить?", ["Тусау кесер", "Беташар", "Шилдехана", "Бесик той"], 0),
    ("betashar", "ru", "kazakh_culture", "Как называется обряд открывания лица невесты?", ["Беташар", "Тусау кесер", "Асар", "Кокпар"], 0),
    ("old_capital", "ru", "kazakh_culture", "Какой город был столицей Казахстана до 1997 года?", ["Алматы", "Шымкент", "Караганда", "Актобе"], 0),
    ("kazy", "ru", "kazakh_culture", "Что такое «казы»?", ["Колбаса из конины", "Кисломолочный напиток", "Сладкая выпечка", "Музыкальный жанр"], 0),
    ("nauryz_month", "kk", "kazakh_culture", "Наурыз мейрамы қай айда тойланады?", ["Қаңтар", "Наурыз", "Мамыр", "Желтоқсан"], 1),
    ("dombra_kk", "kk", "kazakh_culture", "Домбыраның әдетте неше ішегі болады?", ["Екі", "Үш", "Төрт", "Алты"], 0),
    ("abai_kk", "kk", "kazakh_culture", "«Қара сөздердің» авторы кім?", ["Абай Құнанбайұлы", "Мұхтар Әуезов", "Шоқан Уәлиханов", "Ыбырай Алтынсарин"], 0),
    ("kumys_kk", "kk", "kazakh_culture", "Қымыз қандай сүттен дайындалады?", ["Бие сүті", "Сиыр сүті", "Түйе сүті", "Ешкі сүті"], 0),
    ("shubat_kk", "kk", "kazakh_culture", "Шұбат қандай сүттен дайындалады?", ["Түйе сүті", "Бие сүті", "Қой сүті", "Сиыр сүті"], 0),
    ("shanyrak_kk", "kk", "kazakh_culture", "Киіз үйдің төбесіндегі дөңгелек бөлігі қалай аталады?", ["Шаңырақ", "Кереге", "Уық", "Есік"], 0),
    ("tusau_kk", "kk", "kazakh_culture", "Сәбидің алғашқы қадамына арналған салт қалай аталады?", ["Тұсаукесер", "Беташар", "Қыз ұзату", "Асар"], 0),
    ("tenge_kk", "kk", "kazakh_culture", "Қазақстанның ұлттық валютасы қалай аталады?", ["Рубль", "Теңге", "Сом", "Доллар"], 1),
    ("alghys_kk", "kk", "kazakh_culture", "Алғыс айту күні қай күні аталып өтеді?", ["1 наурыз", "22 наурыз", "16 желтоқсан", "1 мамыр"], 0),
]


def make_mc(seed: int = 20240822) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for key, lang, cat, q, choices, ans in MC:
        order = list(range(len(choices)))
        rng.shuffle(order)
        rows.append({
            "id": f"mc-{lang}-{key}",
            "question": q,
            "choices": [choices[i] for i in order],
            "answer": order.index(ans),
            "lang": lang,
            "category": cat,
        })
    return rows
