# Loose stubs: kernel signatures (`x: tl.constexpr`) and every call or operator type-check as Any.
from typing import Any, TypeAlias

def __getattr__(name: str) -> Any: ...

constexpr: TypeAlias = Any
tensor: TypeAlias = Any
dtype: TypeAlias = Any
