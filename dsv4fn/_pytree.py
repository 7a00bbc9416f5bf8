"""Frozen dataclasses registered as PyTorch pytrees.

`@pytree_dataclass` makes a ``dataclass(frozen=True, slots=True, kw_only=True, eq=False)`` and
registers it with ``torch.utils._pytree``:

* fields marked ``static()`` (sizes, ratios, page sizes, names) live in the treespec context, so
  ``tree_map`` never touches them (``register_dataclass`` would turn an ``int`` ratio into a leaf);
* every other field is a child: a tensor, ``None``, or a nested pytree.

``eq=False`` keeps identity hashing (tensors have no boolean equality), which the debug mode's
donation tracking relies on.
"""

import dataclasses
from typing import Any, TypeVar, dataclass_transform

import torch.utils._pytree as pytree

T = TypeVar("T")

_STATIC = "dsv4fn_static"


def static(**kwargs: Any) -> Any:
    """A dataclass field that is part of the treespec (hashable, never a leaf)."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata[_STATIC] = True
    return dataclasses.field(metadata=metadata, **kwargs)


def static_field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(_STATIC))


def child_field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get(_STATIC))


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(dataclasses.field, static))
def pytree_dataclass(cls: type[T]) -> type[T]:
    """Decorator: frozen slotted keyword-only dataclass + pytree registration."""
    dc = dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, weakref_slot=True)(cls)
    statics = static_field_names(dc)
    children = child_field_names(dc)

    def flatten(obj: Any) -> tuple[list[Any], Any]:
        return [getattr(obj, n) for n in children], tuple(getattr(obj, n) for n in statics)

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], Any]:
        return (
            [(pytree.GetAttrKey(n), getattr(obj, n)) for n in children],
            tuple(getattr(obj, n) for n in statics),
        )

    def unflatten(values: Any, context: Any) -> Any:
        kwargs = dict(zip(children, values, strict=True))
        kwargs.update(zip(statics, context, strict=True))
        return dc(**kwargs)

    pytree.register_pytree_node(
        dc,
        flatten,
        unflatten,
        serialized_type_name=f"{dc.__module__}.{dc.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )
    return dc


def replace(obj: T, **changes: Any) -> T:
    """``dataclasses.replace`` for our frozen pytrees (a new object; tensors are shared)."""
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
