"""placeholder"""


def markdown(q: dict) -> list[str]:
    return []
