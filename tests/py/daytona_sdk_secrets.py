"""Drives the unmodified Daytona Python SDK (PyPI `daytona`) against veil-control.

Environment: DAYTONA_API_URL, DAYTONA_API_KEY (the SDK's own), VEIL_TEST_VALUE (a distinctive
value that must never come back). Prints SDK-OK on success; any failure raises.
"""

import os

from daytona import (
    CreateSecretParams,
    Daytona,
    DaytonaConflictError,
    DaytonaNotFoundError,
    UpdateSecretParams,
)
from daytona_api_client.exceptions import ApiException, ConflictException, NotFoundException

# The SDK documents `ApiException` (409) for a duplicate create and `NotFoundException` for a
# missing secret; the generated client raises its status-specific subclasses, and the SDK's own
# error layer may wrap them as Daytona*Error. Accept exactly those, with the right status.
CONFLICT = (ConflictException, DaytonaConflictError)
NOT_FOUND = (NotFoundException, DaytonaNotFoundError)


def expect(exc_types, status, fn, what):
    try:
        fn()
    except exc_types as e:
        got = getattr(e, "status", None) or getattr(e, "status_code", None)
        assert got == status, f"{what}: status {got}"
        if isinstance(e, ApiException):
            assert e.body and '"statusCode":%d' % status in e.body.replace(" ", ""), e.body
        print(f"{what}: {type(e).__name__} as documented")
        return
    raise AssertionError(f"{what}: expected {exc_types}")


def main():
    value = os.environ["VEIL_TEST_VALUE"]
    daytona = Daytona()

    secret = daytona.secret.create(
        CreateSecretParams(
            name="sdk-secret",
            value=value,
            description="created by the Daytona SDK",
            hosts=["API.Example.com"],
        )
    )
    assert secret.name == "sdk-secret", secret
    assert secret.placeholder.startswith("veil_secret_"), secret.placeholder
    assert secret.hosts == ["api.example.com"], secret.hosts
    assert secret.description == "created by the Daytona SDK"
    assert value not in repr(secret)

    expect(
        CONFLICT,
        409,
        lambda: daytona.secret.create(CreateSecretParams(name="sdk-secret", value="other")),
        "duplicate create (409)",
    )

    for i in range(7):
        daytona.secret.create(CreateSecretParams(name=f"sdk-extra-{i}", value=f"extra-{i}"))

    # List, a page at a time.
    seen = []
    cursor = None
    pages = 0
    while True:
        page = daytona.secret.list(cursor=cursor, limit=3)
        pages += 1
        assert page.total == 8, page.total
        seen.extend(s.id for s in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert pages == 3, pages
    assert len(seen) == 8 and len(set(seen)) == 8, seen
    assert secret.id in seen
    filtered = daytona.secret.list(name="extra", sort="name", order="asc")
    assert [s.name for s in filtered.items] == [f"sdk-extra-{i}" for i in range(7)], filtered
    default_page = daytona.secret.list()
    assert default_page.total == 8 and default_page.next_cursor is None

    got = daytona.secret.get(secret.id)
    assert got.id == secret.id and got.placeholder == secret.placeholder
    assert got.created_at is not None and got.updated_at is not None

    updated = daytona.secret.update(
        secret.id, UpdateSecretParams(value=value + "-rotated", hosts=["*.example.com"])
    )
    assert updated.placeholder == secret.placeholder, "rotation keeps the placeholder"
    assert updated.hosts == ["*.example.com"], updated.hosts
    assert updated.description == "created by the Daytona SDK", "omitted field unchanged"
    updated = daytona.secret.update(secret.id, UpdateSecretParams(description="new text"))
    assert updated.hosts == ["*.example.com"] and updated.description == "new text"

    daytona.secret.delete(secret.id)
    expect(NOT_FOUND, 404, lambda: daytona.secret.get(secret.id), "get deleted (404)")
    expect(
        NOT_FOUND,
        404,
        lambda: daytona.secret.update(secret.id, UpdateSecretParams(description="x")),
        "update deleted (404)",
    )
    expect(NOT_FOUND, 404, lambda: daytona.secret.delete(secret.id), "delete deleted (404)")
    assert daytona.secret.list().total == 7
    print("SDK-OK")


if __name__ == "__main__":
    main()
