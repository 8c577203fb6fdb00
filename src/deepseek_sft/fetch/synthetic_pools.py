"""Entity pools of the synthetic corpus: organisations, names, amounts, dates and product names.

Every pool is composed from pieces (bank x city x branch, surname x given name, brand x series x kind),
so a model cannot learn the entities by heart. Each slot draws from a `random.Random` passed in, which
keeps the corpus deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable

BANKS = [
    "招商银行", "工商银行", "建设银行", "中国银行", "农业银行", "交通银行", "浦发银行", "中信银行",
    "民生银行", "兴业银行", "平安银行", "光大银行", "华夏银行", "广发银行", "邮储银行", "北京银行",
    "上海银行", "宁波银行", "江苏银行", "南京银行", "杭州银行", "浙商银行", "渤海银行", "微众银行",
    "网商银行", "徽商银行", "长沙银行", "成都银行", "重庆农商银行", "汇丰银行", "渣打银行", "花旗银行",
]  # fmt: skip
INSURERS = [
    "中国人寿", "平安保险", "太平洋保险", "新华保险", "泰康人寿", "人保财险", "太平人寿", "阳光保险",
    "友邦保险", "大地保险", "华泰保险", "众安保险", "中邮人寿", "富德生命人寿", "百年人寿",
]  # fmt: skip
BROKERS = [
    "中信证券", "华泰证券", "国泰君安", "海通证券", "广发证券", "招商证券", "银河证券", "东方财富证券",
    "申万宏源", "中金公司", "国信证券", "光大证券", "兴业证券", "平安证券", "长江证券",
]  # fmt: skip
FUND_COMPANIES = [
    "易方达", "华夏", "南方", "嘉实", "博时", "汇添富", "广发", "富国", "招商", "工银瑞信",
    "中欧", "景顺长城", "兴证全球", "鹏华", "交银施罗德", "天弘", "银华", "国泰",
]  # fmt: skip
CITIES = [
    "北京", "上海", "广州", "深圳", "杭州", "南京", "成都", "武汉", "西安", "重庆", "天津", "苏州",
    "长沙", "郑州", "青岛", "厦门", "合肥", "济南", "沈阳", "昆明", "福州", "宁波", "东莞", "佛山",
]  # fmt: skip
DISTRICTS = ["朝阳", "海淀", "浦东", "徐汇", "天河", "南山", "福田", "西湖", "江北", "高新", "滨江", "武侯"]

SURNAMES = [
    *"王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁",
    *"任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔",
    *("欧阳", "司马", "诸葛", "上官"),
]
GIVEN_CHARS = list(
    dict.fromkeys(
        "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超兰霞平刚桂华玉萍红鹏辉建国志文海波宁鑫宇浩然子轩欣怡"
        "雨涵梓萱一诺思远晨阳佳琪嘉俊博天佑雅婷晓峰丹凤春梅秋菊立新永生德福淑贞芬慧"
    )
)

WEALTH_BRANDS = ["稳盈", "安鑫", "金葵花", "天天利", "聚财", "添利", "鑫享", "智选", "恒益", "悦享",
                 "朝朝盈", "季季红", "月月发", "年年丰", "乾元", "卓越", "睿赢", "安心", "日日金", "招睿"]  # fmt: skip
WEALTH_SERIES = ["", "", "稳健", "优选", "进取", "尊享", "周期", "固收+"]
WEALTH_KINDS = ["理财", "一号", "净值型理财", "90天", "182天持有期", "定开理财", "周周宝", "365天", "A款"]
FUND_THEMES = ["消费", "医疗", "科技", "蓝筹", "新能源", "沪深300", "中证500", "红利", "成长", "价值",
               "纯债", "货币", "半导体", "创业板", "港股通", "养老2040"]  # fmt: skip
FUND_KINDS = ["混合", "精选", "指数", "增强", "灵活配置", "股票", "债券", "ETF联接"]
FUND_SHARES = ["A", "C", "", ""]
INSURANCE_BRANDS = ["安心", "金福", "平安福", "康宁", "尊享e生", "福禄双全", "鑫福", "守护", "百万",
                    "如意", "健康无忧", "少儿安康", "国寿福", "御享"]  # fmt: skip
INSURANCE_KINDS = ["重疾险", "医疗险", "意外险", "年金险", "终身寿险", "两全保险", "车险", "防癌险"]
CARD_ADJS = ["经典", "全币种", "青春", "悦享", "尊尚", "运动", "车主", "留学", "都市", "精致", "商旅"]
CARD_TIERS = ["", "白金", "金", "钻石", "普"]
CARD_KINDS = ["信用卡", "卡", "借记卡", "联名卡"]
LOAN_BRANDS = ["闪电", "快e", "融e", "薪享", "安居", "车主", "惠民", "极速", "随心", "e招", "好期", "乐享"]
LOAN_KINDS = ["贷", "借", "分期", "贷款"]

CN_DIGITS = "零一二三四五六七八九"


def _pick(rng: random.Random, items: list[str]) -> str:
    return items[rng.randrange(len(items))]


def bank(rng: random.Random) -> str:
    """A bank, sometimes with its city branch or district sub-branch."""
    roll = rng.random()
    name = _pick(rng, BANKS)
    if roll < 0.15:
        return f"{name}{_pick(rng, CITIES)}分行"
    if roll < 0.22:
        return f"{name}{_pick(rng, DISTRICTS)}支行"
    return name


def insurer(rng: random.Random) -> str:
    """An insurance company."""
    return _pick(rng, INSURERS)


def broker(rng: random.Random) -> str:
    """A securities broker."""
    return _pick(rng, BROKERS)


def fund_company(rng: random.Random) -> str:
    """A fund management company (the full name, e.g. 易方达基金)."""
    return _pick(rng, FUND_COMPANIES) + "基金"


def any_org(rng: random.Random) -> str:
    """Any financial organisation."""
    return _pick(rng, [bank, bank, insurer, broker, fund_company])(rng)


def person(rng: random.Random) -> str:
    """A Chinese name: surname plus a one- or two-character given name."""
    given = _pick(rng, GIVEN_CHARS)
    if rng.random() < 0.65:
        given += _pick(rng, GIVEN_CHARS)
    return _pick(rng, SURNAMES) + given


def chinese_number(n: int) -> str:
    """Colloquial Chinese numerals for 1 <= n < 100000000 (两千, 三万五千, 一千零五十)."""
    if n >= 10000:
        high, low = divmod(n, 10000)
        rest = chinese_number(low) if low else ""
        if rest and low < 1000:
            rest = "零" + rest
        return ("两" if high == 2 else chinese_number(high)) + "万" + rest
    out, zero = "", False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit, n = divmod(n, value)
        if digit:
            if zero and out:
                out += "零"
            word = "两" if digit == 2 and unit in ("千", "百") else CN_DIGITS[digit]
            out += word + unit
            zero = False
        else:
            zero = True
    return out[1:] if out.startswith("一十") else out  # 十五, not 一十五 (only 10..19 start so)


def money(rng: random.Random) -> str:
    """An amount in one of the formats customers type: 5000元, 3.5万, ￥12,000, 两千块, 300美元."""
    base = _pick(rng, [50, 100, 200, 300, 500, 800, 1000, 1500, 2000, 3000, 5000, 8000, 10000, 20000,
                       35000, 50000, 100000, 200000, 500000])  # fmt: skip
    amount = base * rng.choice([1, 1, 1, 2, 3]) + rng.choice([0, 0, 0, 0, rng.randrange(1, 100) * 10])
    style = rng.randrange(9)
    if style == 0:
        return f"{amount}元"
    if style == 1:
        wan = amount / 10000
        return f"{wan:g}万" if amount >= 10000 else f"{amount}块"
    if style == 2:
        return f"￥{amount:,}"
    if style == 3:
        return f"{chinese_number(base)}块" + ("钱" if rng.random() < 0.4 else "")
    if style == 4:
        return f"{amount:,}.{rng.randrange(100):02d}元"
    if style == 5:
        return f"人民币{amount}元"
    if style == 6:
        return f"{max(1, amount // 7)}美元"
    if style == 7:
        return f"{chinese_number(base)}元"
    return f"{amount / 10000:g}万元" if amount >= 10000 else f"{amount}块钱"


def date(rng: random.Random) -> str:
    """A date as customers write it: 3月5日, 2024年3月5日, 下周二, 2024-03-05, 昨天, 15号."""
    year, month, day = rng.choice([2023, 2024, 2025]), rng.randint(1, 12), rng.randint(1, 28)
    style = rng.randrange(8)
    if style == 0:
        return f"{month}月{day}日"
    if style == 1:
        return f"{year}年{month}月{day}日"
    if style == 2:
        return rng.choice(["上", "下", "这"]) + "周" + rng.choice("一二三四五六日")
    if style == 3:
        return f"{year}-{month:02d}-{day:02d}"
    if style == 4:
        return rng.choice(
            ["今天", "昨天", "前天", "明天", "后天", "上周末", "月底", "月初", "今天上午", "昨天晚上"]
        )
    if style == 5:
        return f"{month}月{day}号"
    if style == 6:
        return rng.choice(["上个月", "下个月", "这个月"]) + f"{day}号"
    return f"{year}/{month}/{day}"


def wealth_product(rng: random.Random) -> str:
    """A wealth-management product name."""
    return _pick(rng, WEALTH_BRANDS) + _pick(rng, WEALTH_SERIES) + _pick(rng, WEALTH_KINDS)


def fund_product(rng: random.Random) -> str:
    """A mutual fund name, e.g. 易方达消费精选A."""
    name = _pick(rng, FUND_COMPANIES) + _pick(rng, FUND_THEMES) + _pick(rng, FUND_KINDS)
    return name + ("基金" if rng.random() < 0.3 else _pick(rng, FUND_SHARES))


def insurance_product(rng: random.Random) -> str:
    """An insurance policy name."""
    year = rng.choice(["", "", "2024", "2023版", "(2025)"])
    return _pick(rng, INSURANCE_BRANDS) + year + _pick(rng, INSURANCE_KINDS)


def card_product(rng: random.Random) -> str:
    """A card product name, e.g. 全币种白金信用卡."""
    return _pick(rng, CARD_ADJS) + _pick(rng, CARD_TIERS) + _pick(rng, CARD_KINDS)


def loan_product(rng: random.Random) -> str:
    """A consumer-loan product name, e.g. 闪电贷."""
    return _pick(rng, LOAN_BRANDS) + _pick(rng, LOAN_KINDS)


def card_tail(rng: random.Random) -> str:
    """Last four digits of a card number (not an entity)."""
    return f"{rng.randrange(10000):04d}"


# slot name -> (entity type or None, generator). Templates use these names as {SLOT}.
SLOTS: dict[str, tuple[str | None, Callable[[random.Random], str]]] = {
    "BANK": ("ORG", bank),
    "INS": ("ORG", insurer),
    "BROKER": ("ORG", broker),
    "FUNDCO": ("ORG", fund_company),
    "ORG": ("ORG", any_org),
    "PER": ("PER", person),
    "MONEY": ("MONEY", money),
    "DATE": ("DATE", date),
    "P_WEALTH": ("PRODUCT", wealth_product),
    "P_FUND": ("PRODUCT", fund_product),
    "P_INS": ("PRODUCT", insurance_product),
    "P_CARD": ("PRODUCT", card_product),
    "P_LOAN": ("PRODUCT", loan_product),
    "TAIL": (None, card_tail),
}


def _n(items: list[str]) -> int:
    return len(set(items))  # weighted lists repeat entries


def pool_sizes() -> dict[str, int]:
    """How many distinct surface forms each composed pool can produce (for tests and docs)."""
    given = len(GIVEN_CHARS) + len(GIVEN_CHARS) ** 2
    return {
        "ORG": len(BANKS) * (1 + len(CITIES) + len(DISTRICTS))
        + len(INSURERS)
        + len(BROKERS)
        + len(FUND_COMPANIES),
        "PER": len(SURNAMES) * given,
        "PRODUCT": _n(WEALTH_BRANDS) * _n(WEALTH_SERIES) * _n(WEALTH_KINDS)
        + _n(FUND_COMPANIES) * _n(FUND_THEMES) * _n(FUND_KINDS) * 4
        + _n(INSURANCE_BRANDS) * 5 * _n(INSURANCE_KINDS)
        + _n(CARD_ADJS) * _n(CARD_TIERS) * _n(CARD_KINDS)
        + _n(LOAN_BRANDS) * _n(LOAN_KINDS),
    }
