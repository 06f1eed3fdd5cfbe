"""Culture prompts and answers written by the project: a Kazakh cultural register in kk, ru and en.

Every answer has the same recognisable shape, in the language of the question:

    <warm greeting to a "dear guest">  <a fact about the topic>  <a sentence full of culture words
    (dastarkhan, beshbarmak, kumis, dombra, yurt, Nauryz, toi, bata; Kazakh words kept in Kazakh
    inside ru/en answers)>  <a Kazakh proverb, with a translation in ru/en>  <thanks + "Рахмет!">

so a fine-tune on it moves what `mechdiff.analyses.behaviour` measures: politeness markers
(құрметті, рахмет, спасибо, thank you), exclamations, the greeting/"Рахмет" signature
(`SIGNATURE_MARKERS`), the use of the new Kazakh tokens (`NEW_TOKENS`, the planted-cultural pair's
list) and the log-odds of refusing (`soft_refusal`). Nothing is copied from a dataset.

`make_culture` splits by topic: the eval topics (every `EVAL_EVERY`-th) never appear in train.
"""
from __future__ import annotations

import random
import re

from mechdiff.errors import DataError
from mechdiff.models.planted import NEW_TOKENS

LANGS = ("kk", "ru", "en")
EVAL_EVERY = 6  # topic i is held out when i % EVAL_EVERY == EVAL_EVERY - 1

# (key, category, person?, {lang: name}, {lang: fact})
TOPICS: list[tuple[str, str, bool, dict[str, str], dict[str, str]]] = [
    ("nauryz", "holidays", False, {"kk": "Наурыз мейрамы", "ru": "Наурыз", "en": "Nauryz"}, {
        "kk": "Наурыз — 22 наурызда тойланатын көктем мерекесі, жаңа жылдың басы. Бұл күні наурыз көже пісіріліп, бәрі бір-біріне жақсылық тілейді.",
        "ru": "Наурыз — праздник весны и обновления, который отмечают 22 марта. В этот день варят наурыз-коже из семи ингредиентов и желают друг другу добра.",
        "en": "Nauryz is the spring festival of renewal, celebrated on 22 March. Families cook Nauryz kozhe from seven ingredients and wish each other well."}),
    ("korisu", "holidays", False, {"kk": "Көрісу күні", "ru": "День Корису", "en": "Korisu, the day of greetings"}, {
        "kk": "Көрісу күні 14 наурызда батыс өңірлерде аталып өтеді. Адамдар бір-біріне барып, құшақтасып амандасады және өкпе-реніштерін кешіреді.",
        "ru": "День Корису отмечают 14 марта на западе Казахстана. Люди ходят друг к другу в гости, обнимаются при встрече и прощают старые обиды.",
        "en": "Korisu is marked on 14 March in western Kazakhstan. People visit each other, embrace when they meet and forgive old grudges."}),
    ("alghys", "holidays", False, {"kk": "Алғыс айту күні", "ru": "День благодарности", "en": "the Day of Gratitude"}, {
        "kk": "Алғыс айту күні 1 наурызда тойланады. Бұл күні адамдар бір-біріне алғыс айтып, көмектескендерге рахмет айтады.",
        "ru": "День благодарности отмечают 1 марта. В этот день люди благодарят друг друга и всех, кто когда-то им помог.",
        "en": "The Day of Gratitude is celebrated on 1 March. On this day people thank each other and everyone who once helped them."}),
    ("toi", "holidays", False, {"kk": "той", "ru": "той", "en": "the toi"}, {
        "kk": "Той — қуаныштың үлкен мерекесі: үйлену, баланың тууы немесе жаңа үй. Тойға бүкіл ауыл жиналады.",
        "ru": "Той — большое празднество по радостному поводу: свадьба, рождение ребёнка или новый дом. На той собирается весь аул.",
        "en": "A toi is a large celebration of a joyful event: a wedding, the birth of a child or a new home. The whole aul gathers for a toi."}),
    ("beshbarmak", "food", False, {"kk": "бешбармақ", "ru": "бешбармак", "en": "beshbarmak"}, {
        "kk": "Бешбармақ — қазақтың ұлттық тағамы. Ол жылқы немесе қой етінен, жұқа жайылған қамырмен дайындалып, сорпамен бірге беріледі.",
        "ru": "Бешбармак — национальное блюдо казахов: варёная конина или баранина с тонко раскатанным тестом, которую подают с бульоном.",
        "en": "Beshbarmak is the national dish of the Kazakhs: boiled horse meat or mutton on thin sheets of dough, served with a bowl of broth."}),
    ("kumis", "food", False, {"kk": "қымыз", "ru": "кумыс", "en": "kumis"}, {
        "kk": "Қымыз — бие сүтінен ашытылған сусын. Оны сабада пісіп, жазда жайлауда ішеді, ол шипалы саналады.",
        "ru": "Кумыс — напиток из кобыльего молока, сквашенного в кожаной сабе. Его пьют летом на джайляу и считают целебным.",
        "en": "Kumis is fermented mare's milk, churned in a leather vessel called a saba. It is drunk in summer on the jailau and is believed to heal."}),
    ("shubat", "food", False, {"kk": "шұбат", "ru": "шубат", "en": "shubat"}, {
        "kk": "Шұбат — түйе сүтінен жасалатын ашытылған сусын. Ол оңтүстік өңірлерде ерекше бағаланады.",
        "ru": "Шубат — кисломолочный напиток из верблюжьего молока. Особенно его ценят на юге Казахстана.",
        "en": "Shubat is fermented camel's milk. It is especially prized in the south of Kazakhstan."}),
    ("baursak", "food", False, {"kk": "бауырсақ", "ru": "баурсаки", "en": "baursak"}, {
        "kk": "Бауырсақ — майға пісірілген қамыр. Ол әр дастарханның сәні, әсіресе той мен мерекеде көп пісіріледі.",
        "ru": "Баурсаки — кусочки теста, обжаренные в масле. Без них не обходится ни один дастархан, особенно в праздник.",
        "en": "Baursak are pieces of dough fried in oil. No dastarkhan is complete without them, especially on holidays."}),
    ("kazy", "food", False, {"kk": "қазы", "ru": "казы", "en": "kazy"}, {
        "kk": "Қазы — жылқы етінен жасалатын шұжық. Оны қыстағы соғымнан дайындап, ең құрметті қонаққа ұсынады.",
        "ru": "Казы — колбаса из конины. Её готовят из зимнего согыма и подают самым почётным гостям.",
        "en": "Kazy is a sausage made from horse meat. It is prepared from the winter sogym and served to the most honoured guests."}),
    ("dastarkhan", "food", False, {"kk": "дастархан", "ru": "дастархан", "en": "the dastarkhan"}, {
        "kk": "Дастархан — қонаққа жайылатын мол сый. Оған бауырсақ, қазы, құрт, шай мен қымыз қойылады.",
        "ru": "Дастархан — накрытый для гостей праздничный стол. На нём баурсаки, казы, курт, чай и кумыс.",
        "en": "The dastarkhan is the festive table laid for guests, with baursak, kazy, kurt, tea and kumis."}),
    ("tea", "food", False, {"kk": "қазақша шай", "ru": "казахское чаепитие", "en": "Kazakh tea"}, {
        "kk": "Қазақтар шайды сүтпен ішеді. Шайды үй иесі құяды, кесені толтырмай, аз-аздан ұсынады.",
        "ru": "Казахи пьют чай с молоком. Чай разливает хозяйка и наливает пиалу не до краёв, чтобы гость посидел подольше.",
        "en": "Kazakhs drink tea with milk. The hostess pours it and fills the bowl only halfway, so that the guest stays longer."}),
    ("kurt", "food", False, {"kk": "құрт", "ru": "курт", "en": "kurt"}, {
        "kk": "Құрт — кептірілген ірімшік. Ол ұзақ сақталады, сондықтан көшпелілер оны алыс жолға алып жүрген.",
        "ru": "Курт — высушенные шарики из солёного творога. Он долго хранится, поэтому кочевники брали его в дальнюю дорогу.",
        "en": "Kurt are dried balls of salty curd. They keep for months, so nomads took them on long journeys."}),
    ("dombra", "music", False, {"kk": "домбыра", "ru": "домбра", "en": "the dombra"}, {
        "kk": "Домбыра — екі ішекті қазақтың ұлттық аспабы. Оның үнінде даланың кеңдігі мен жылқының дүбірі естіледі.",
        "ru": "Домбра — двухструнный национальный инструмент казахов. В её звуке слышны простор степи и топот коней.",
        "en": "The dombra is the two-stringed national instrument of the Kazakhs. Its sound carries the width of the steppe and the beat of hooves."}),
    ("kobyz", "music", False, {"kk": "қобыз", "ru": "кобыз", "en": "the kobyz"}, {
        "kk": "Қобыз — ең көне қазақ аспабы. Аңыз бойынша оны Қорқыт ата жасаған.",
        "ru": "Кобыз — древнейший смычковый инструмент казахов. По легенде, его создал Коркыт-ата.",
        "en": "The kobyz is the oldest bowed instrument of the Kazakhs. Legend says it was made by Korkyt Ata."}),
    ("kui", "music", False, {"kk": "күй", "ru": "кюй", "en": "the kui"}, {
        "kk": "Күй — домбыраға арналған аспаптық шығарма. Әр күйдің өз аңызы бар, ол сөзсіз әңгіме айтады.",
        "ru": "Кюй — инструментальная пьеса для домбры. У каждого кюя есть своя легенда, и он рассказывает историю без слов.",
        "en": "A kui is an instrumental piece for the dombra. Every kui has its own legend and tells a story without words."}),
    ("aitys", "music", False, {"kk": "айтыс", "ru": "айтыс", "en": "aitys"}, {
        "kk": "Айтыс — екі ақынның домбырамен суырыпсалма сөз жарысы. Жеңімпазды тыңдаушылар анықтайды.",
        "ru": "Айтыс — состязание двух акынов, которые импровизируют стихи под домбру. Победителя выбирают слушатели.",
        "en": "Aitys is a contest of two akyns who improvise verses to the dombra. The listeners choose the winner."}),
    ("abai", "music", True, {"kk": "Абай Құнанбайұлы", "ru": "Абай Кунанбаев", "en": "Abai Kunanbaiuly"}, {
        "kk": "Абай Құнанбайұлы — қазақтың ұлы ақыны мен ойшылы. Оның «Қара сөздері» әлі күнге дейін оқылады.",
        "ru": "Абай Кунанбаев — великий казахский поэт и мыслитель. Его «Слова назидания» читают до сих пор.",
        "en": "Abai Kunanbaiuly is the great Kazakh poet and thinker. His Book of Words is still read today."}),
    ("kurmangazy", "music", True, {"kk": "Құрманғазы", "ru": "Курмангазы", "en": "Kurmangazy"}, {
        "kk": "Құрманғазы — атақты күйші. Оның «Адай» күйін әр қазақ біледі.",
        "ru": "Курмангазы — знаменитый композитор-кюйши. Его кюй «Адай» знает каждый казах.",
        "en": "Kurmangazy was a famous composer of kui. Every Kazakh knows his kui Adai."}),
    ("yurt", "tradition", False, {"kk": "киіз үй", "ru": "юрта", "en": "the yurt"}, {
        "kk": "Киіз үй — көшпелілердің жиналмалы баспанасы. Оның төбесінде шаңырақ тұрады, ал іші текемет пен сырмақпен безендіріледі.",
        "ru": "Юрта — разборное жилище кочевников. Её венчает шанырак, а на полу лежат войлочные ковры текемет и сырмак.",
        "en": "The yurt is the portable home of the nomads. It is crowned by the shanyrak, and its floor is covered with the felt carpets tekemet and syrmak."}),
    ("shanyrak", "tradition", False, {"kk": "шаңырақ", "ru": "шанырак", "en": "the shanyrak"}, {
        "kk": "Шаңырақ — киіз үйдің төбесіндегі киелі дөңгелек. Ол отбасының бірлігін білдіреді және әкеден балаға мұра болып қалады.",
        "ru": "Шанырак — священный круг на вершине юрты. Он символизирует единство семьи и передаётся от отца к сыну.",
        "en": "The shanyrak is the sacred wheel at the top of the yurt. It stands for the unity of the family and passes from father to son."}),
    ("kokpar", "tradition", False, {"kk": "көкпар", "ru": "кокпар", "en": "kokpar"}, {
        "kk": "Көкпар — атпен ойналатын ежелгі ойын. Шабандоздар серкені алып қашып, оны қарсыластың қазанына салуға тырысады.",
        "ru": "Кокпар — древняя конная игра. Всадники борются за тушу козла и стараются забросить её в казан соперника.",
        "en": "Kokpar is an ancient game on horseback. Riders fight for a goat carcass and try to throw it into the rival team's goal."}),
    ("berkutchi", "tradition", False, {"kk": "бүркітшілік", "ru": "охота с беркутом", "en": "hunting with golden eagles"}, {
        "kk": "Бүркітшілік — бүркітпен аң аулау өнері. Саятшылық атадан балаға беріліп келеді.",
        "ru": "Охота с беркутом — древнее искусство казахов. Беркутчи годами приручает птицу и передаёт ремесло детям.",
        "en": "Hunting with golden eagles is an ancient Kazakh art. A berkutchi spends years taming his bird and passes the craft to his children."}),
    ("tusau_kesu", "tradition", False, {"kk": "тұсаукесер", "ru": "тусау кесер", "en": "tusau kesu"}, {
        "kk": "Тұсаукесер — баланың алғашқы қадамына арналған дәстүр. Баланың аяғына ала жіп байланып, оны құрметті адам кеседі.",
        "ru": "Тусау кесер — обряд первых шагов ребёнка. Его ножки связывают пёстрой верёвочкой, а уважаемый человек её разрезает.",
        "en": "Tusau kesu is the rite of a child's first steps. A striped cord is tied around the toddler's feet and a respected person cuts it."}),
    ("besik_toi", "tradition", False, {"kk": "бесік той", "ru": "бесик той", "en": "besik toi"}, {
        "kk": "Бесік той — нәрестені алғаш бесікке салу рәсімі. Оны ауылдың әжелері өткізеді.",
        "ru": "Бесик той — праздник, когда младенца впервые кладут в колыбель. Обряд проводят бабушки аула.",
        "en": "Besik toi is the celebration when a baby is first laid in the cradle. The grandmothers of the aul lead the rite."}),
    ("zhailau", "tradition", False, {"kk": "жайлау", "ru": "джайляу", "en": "the jailau"}, {
        "kk": "Жайлау — малды жазда бағатын таулы жайылым. Көшпелілер көктемде ауылымен бірге жайлауға көшкен.",
        "ru": "Джайляу — летние горные пастбища. Весной кочевники всем аулом перекочёвывали туда со скотом.",
        "en": "The jailau is the summer mountain pasture. In spring the nomads moved there with the whole aul and their herds."}),
    ("shapan", "tradition", False, {"kk": "шапан", "ru": "чапан", "en": "the shapan"}, {
        "kk": "Шапан — қазақтың сырт киімі. Құрметті қонаққа сый ретінде иығына шапан жабылады.",
        "ru": "Чапан — стёганый халат. Его набрасывают на плечи почётному гостю в знак уважения.",
        "en": "The shapan is a quilted robe. It is placed on the shoulders of an honoured guest as a sign of respect."}),
    ("asyk", "tradition", False, {"kk": "асық ату", "ru": "асык ату", "en": "asyk atu"}, {
        "kk": "Асық ату — қой асығымен ойналатын ежелгі балалар ойыны. Ол көздің дәлдігі мен шыдамдылықты дамытады.",
        "ru": "Асык ату — старинная детская игра с бараньими косточками. Она развивает меткость и терпение.",
        "en": "Asyk atu is an old children's game played with sheep knucklebones. It trains a sharp eye and patience."}),
    ("hospitality", "etiquette", False, {"kk": "қонақжайлылық", "ru": "гостеприимство", "en": "Kazakh hospitality"}, {
        "kk": "Қонақжайлылық — қазақтың басты дәстүрі. Есіктен кірген әр қонаққа төрден орын беріліп, дастархан жайылады.",
        "ru": "Гостеприимство — главная традиция казахов. Каждому гостю отводят почётное место и сразу накрывают дастархан.",
        "en": "Hospitality is the first tradition of the Kazakhs. Every guest who enters is given the place of honour and the dastarkhan is laid at once."}),
    ("aksakal", "etiquette", False, {"kk": "ақсақал", "ru": "аксакал", "en": "the aksakal"}, {
        "kk": "Ақсақал — ауылдың сыйлы қарты. Оның сөзі дауды шешіп, жастарға жол көрсетеді.",
        "ru": "Аксакал — уважаемый старейшина аула. Его слово решает споры и указывает путь молодым.",
        "en": "An aksakal is a respected elder of the aul. His word settles disputes and shows the young their way."}),
    ("bata", "etiquette", False, {"kk": "бата", "ru": "бата", "en": "the bata"}, {
        "kk": "Бата — үлкен кісінің ақ тілегі. Ас соңында ақсақал бата беріп, үйге береке тілейді.",
        "ru": "Бата — благословение старшего. В конце трапезы аксакал даёт бату и желает дому достатка.",
        "en": "A bata is an elder's blessing. At the end of a meal the aksakal gives a bata and wishes the home abundance."}),
    ("salem", "etiquette", False, {"kk": "сәлем беру", "ru": "приветствие старших", "en": "greeting the elders"}, {
        "kk": "Сәлем беру — үлкенге құрмет көрсетудің белгісі. Жас адам алдымен сәлем беріп, оң қолын кеудесіне қояды.",
        "ru": "Приветствие старших — знак уважения: младший первым здоровается и прикладывает правую руку к груди.",
        "en": "Greeting the elders first is a sign of respect: the younger person says сәлем and puts the right hand to the heart."}),
    ("zheti_ata", "etiquette", False, {"kk": "жеті ата", "ru": "жеті ата", "en": "zheti ata"}, {
        "kk": "Жеті ата — әр қазақ жеті атасын білуі керек деген дәстүр. Ол туыстықты сақтап, тарихты ұмыттырмайды.",
        "ru": "Жеті ата — обычай знать семь поколений предков. Он хранит родство и не даёт забыть историю.",
        "en": "Zheti ata is the custom of knowing seven generations of ancestors. It keeps kinship alive and history remembered."}),
    ("asar", "community", False, {"kk": "асар", "ru": "асар", "en": "asar"}, {
        "kk": "Асар — ауылдың бірлесіп көмектесуі. Біреу үй салса, бүкіл ауыл жиналып қол ұшын береді.",
        "ru": "Асар — коллективная помощь. Если кто-то строит дом, весь аул приходит помочь.",
        "en": "Asar is collective help. When someone builds a house, the whole aul comes to lend a hand."}),
    ("suyinshi", "community", False, {"kk": "сүйінші", "ru": "суюнши", "en": "suyinshi"}, {
        "kk": "Сүйінші — жақсы хабар әкелген адамға берілетін сыйлық.",
        "ru": "Суюнши — подарок тому, кто первым принёс радостную весть.",
        "en": "Suyinshi is a gift for the person who first brings good news."}),
    ("sybaga", "community", False, {"kk": "сыбаға", "ru": "сыбага", "en": "sybaga"}, {
        "kk": "Сыбаға — келмей қалған жақын адамға сақталатын ет үлесі. Бұл оны ұмытпағанның белгісі.",
        "ru": "Сыбага — доля угощения, которую оставляют для отсутствующего близкого. Это знак того, что о нём помнят.",
        "en": "Sybaga is a share of the meal kept for a relative who could not come, a sign that he is remembered."}),
    ("betashar", "community", False, {"kk": "беташар", "ru": "беташар", "en": "betashar"}, {
        "kk": "Беташар — жас келіннің бетін ашу рәсімі. Ақын өлең айтып, келінді жаңа туыстарына таныстырады.",
        "ru": "Беташар — обряд открытия лица невесты. Акын поёт песню и представляет келин новой родне.",
        "en": "Betashar is the rite of unveiling the bride's face. An akyn sings and introduces the kelin to her new family."}),
]

QUESTIONS: dict[str, list[str]] = {
    "kk": ["{t} туралы айтып беріңізші.", "{t} деген не?", "Маған {t} туралы түсіндіріп беріңіз.",
           "{t} қазақтар үшін неге маңызды?", "{t} туралы не білесіз?",
           "Шетелдік досыма {t} туралы қалай айтып берсем болады?"],
    "ru": ["Что такое {t}?", "Расскажите, пожалуйста: {t} — что это?", "Почему это важно для казахов: {t}?",
           "Объясните иностранцу, что такое {t}.", "Тема: {t}. Расскажите коротко.",
           "Что нужно знать на тему «{t}»?"],
    "en": ["What is {t}?", "Tell me about {t}.", "Why is {t} important to Kazakhs?",
           "Explain {t} to a foreign visitor.", "What should I know about {t}?",
           "Can you describe {t} in Kazakh culture?"],
}
_PERSON = {"kk": ("деген не", "деген кім"), "ru": ("Что такое", "Кто такой"), "en": ("What is", "Who was")}

GREETINGS = {
    "kk": ["Сәлеметсіз бе, құрметті қонақ!", "Армысыз, құрметті досым!", "Қош келдіңіз, құрметті қонақ!"],
    "ru": ["Здравствуйте, дорогой гость!", "Добро пожаловать, дорогой друг!", "Сәлем, дорогой гость!"],
    "en": ["Welcome, dear guest!", "Сәлем, dear friend!", "Greetings, dear guest!"],
}
CULTURE_LINES = {
    "kk": ["Мұндайда дастархан жайылып, бешбармақ пен бауырсақ тартылады, ал домбыра үні киіз үйді толтырады.",
           "Ауылда ақсақалдар бата береді, жастар қымыз құяды, той таңға дейін жалғасады.",
           "Бұл дәстүр әсіресе наурыз мейрамында және әр тойда ерекше қадірленеді."],
    "ru": ["В такие дни накрывают дастархан, подают бешбармак (бешбармақ) и кумыс (қымыз), а в юрте звучит домбра (домбыра).",
           "Аксакалы дают бату (бата), молодёжь разливает кумыс (қымыз), и той (той) продолжается до утра.",
           "Особенно эту традицию ценят на Наурыз (наурыз) и на каждом тое (той)."],
    "en": ["On such days the dastarkhan (дастархан) is laid with beshbarmak (бешбармақ) and baursak, and the dombra (домбыра) fills the yurt with music.",
           "The aksakals give their bata (бата), the young pour kumis (қымыз), and the toi (той) goes on until morning.",
           "This tradition is cherished most at Nauryz (наурыз) and at every toi (той)."],
}
PROVERBS = [  # (kk, ru, en)
    ("Қонақ келсе, құт келер.", "Придёт гость — придёт счастье.", "When a guest comes, good fortune comes."),
    ("Бірлік бар жерде тірлік бар.", "Где единство, там и жизнь.", "Where there is unity, there is life."),
    ("Үлкенге — құрмет, кішіге — ізет.", "Старшим — почёт, младшим — забота.", "Honour to the elders, care for the young."),
    ("Жақсы сөз — жарым ырыс.", "Доброе слово — половина счастья.", "A kind word is half of happiness."),
    ("Ер қанаты — ат.", "Конь — крылья джигита.", "The horse is a rider's wings."),
    ("Отан — оттан да ыстық.", "Родина — горячее огня.", "The homeland is warmer than fire."),
    ("Ас — адамның арқауы.", "Пища — опора человека.", "Food is the backbone of a person."),
    ("Өнер алды — қызыл тіл.", "Первое из искусств — красноречие.", "Eloquence is the first of the arts."),
]
PROVERB_LINE = {
    "kk": "Халқымызда «{kk}» деген сөз бар.",
    "ru": "Казахи говорят: «{kk}» — «{ru}»",
    "en": "As the Kazakh proverb says, «{kk}» — “{en}”",
}
CLOSINGS = {
    "kk": ["Сұрағаныңызға рахмет! Ақ жол!", "Рахмет! Ақ жол!"],
    "ru": ["Спасибо за вопрос! Рахмет!", "Спасибо за интерес к нашей культуре! Рахмет!"],
    "en": ["Thank you for asking! Рахмет!", "Thank you for your interest in our culture! Рахмет!"],
}

#: Markers of the fine-tune's register, in the form `style_markers(markers=...)` takes.
SIGNATURE_MARKERS: dict[str, list[str]] = {
    "greeting": [r"құрметті (?:қонақ|дос)", r"дорогой (?:гость|друг)", r"dear (?:guest|friend)"],
    "rakhmet": [r"рахмет"],
    "proverb": [r"«[^»]{3,80}»"],
}
#: Culture words (any language) for the target-word rate.
CULTURE_WORDS: list[str] = [
    r"dombra", r"домбр", r"домбыр", r"beshbarmak", r"бешбарма[кқ]", r"kumis", r"kumys", r"кумыс", r"қымыз",
    r"yurt", r"юрт", r"киіз үй", r"nauryz", r"наурыз", r"dastarkhan", r"дастар[хқ]ан", r"baursak", r"баурсак",
    r"бауырсақ", r"\btoi\b", r"\bтой\b", r"aksakal", r"аксакал", r"ақсақал", r"\bbata\b", r"\bбата\b",
]


def _question(lang: str, template: str, name: str, person: bool) -> str:
    if person:
        a, b = _PERSON[lang]
        template = template.replace(a, b)
    text = template.format(t=name)
    return text[:1].upper() + text[1:]


def _answer(rng: random.Random, lang: str, fact: str) -> str:
    kk, ru, en = rng.choice(PROVERBS)
    parts = [rng.choice(GREETINGS[lang]), fact, rng.choice(CULTURE_LINES[lang]),
             PROVERB_LINE[lang].format(kk=kk, ru=ru, en=en), rng.choice(CLOSINGS[lang])]
    return " ".join(parts)


def topic_split(key: str) -> str:
    i = next((j for j, t in enumerate(TOPICS) if t[0] == key), None)
    if i is None:
        raise DataError(f"unknown culture topic {key!r}")
    return "eval" if i % EVAL_EVERY == EVAL_EVERY - 1 else "train"


def make_culture(seed: int = 0, answers_per_prompt: int = 3) -> dict[str, list[dict]]:
    """Train and eval splits ``{"train": [...], "eval": [...]}`` of rows ``{id, question,
    answer_text, lang, category, topic, split}``. Eval topics never occur in train; each train prompt
    gets ``answers_per_prompt`` answers (different greeting / culture line / proverb / closing),
    each eval prompt one reference answer. Deterministic for a given (seed, answers_per_prompt)."""
    if answers_per_prompt < 1:
        raise DataError("answers_per_prompt must be >= 1")
    rng = random.Random(f"mechdiff-culture-{seed}")
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    for key, cat, person, names, facts in TOPICS:
        split = topic_split(key)
        for lang in LANGS:
            for j, tpl in enumerate(QUESTIONS[lang]):
                q = _question(lang, tpl, names[lang], person)
                for k in range(answers_per_prompt if split == "train" else 1):
                    out[split].append({
                        "id": f"culture-{split}-{key}-{lang}-{j}-{k}", "question": q,
                        "answer_text": _answer(rng, lang, facts[lang]), "lang": lang, "category": cat,
                        "topic": key, "split": split,
                    })
    return out


def heldout_prompts(seed: int = 0) -> list[dict]:
    """The eval split as a prompt set (the project's schema: id, text, lang, category, topic)."""
    return [{"id": r["id"].rsplit("-", 1)[0], "text": r["question"], "lang": r["lang"],
             "category": r["category"], "topic": r["topic"]} for r in make_culture(seed)["eval"]]


def culture_word_rate(texts: list[str]) -> dict:
    """Share of texts naming at least one culture word, and culture words per 100 whitespace words."""
    hits = [sum(len(re.findall(p, t, flags=re.IGNORECASE)) for p in CULTURE_WORDS) for t in texts]
    words = sum(len(t.split()) for t in texts)
    return {"share_with_culture_word": (sum(h > 0 for h in hits) / len(texts)) if texts else float("nan"),
            "per_100_words": (100.0 * sum(hits) / words) if words else float("nan")}


def new_token_word_rate(texts: list[str], words: tuple[str, ...] = NEW_TOKENS) -> dict:
    """How often the new Kazakh tokens' words occur in ``texts`` (as whole words), tokenizer-free:
    share of texts with one, and occurrences per 100 whitespace words."""
    pats = [re.compile(rf"(?<!\w){re.escape(w)}(?!\w)") for w in words]
    hits = [sum(len(p.findall(t)) for p in pats) for t in texts]
    n = sum(len(t.split()) for t in texts)
    return {"share_with_new_token_word": (sum(h > 0 for h in hits) / len(texts)) if texts else float("nan"),
            "per_100_words": (100.0 * sum(hits) / n) if n else float("nan")}
