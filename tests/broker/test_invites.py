"""mesh_create and invites over the wire, including racing claims."""

from __future__ import annotations

import hashlib
from pathlib import Path

import trio
from cmtest.broker import Identity, new_key, now_ms, open_inproc_broker, open_peer

from claudemesh.shared.protocol import crypto, errors, wire


def mesh_create(key: crypto.KeyPair, name: str = "team", **extra: object) -> wire.MeshCreate:
    ts = now_ms()
    return wire.MeshCreate(
        id="mc",
        name=name,
        pubkey=key.public_hex,
        timestamp=ts,
        signature=key.sign(wire.mesh_create_canonical(name, key.public_hex, ts)),
        display_name="owner",
        **extra,  # type: ignore[arg-type]
    )


def invite_put(
    admin: Identity,
    invite_id: str,
    claim: crypto.KeyPair,
    *,
    uses: int = 1,
    expires_at: int | None = None,
    role: wire.Role = "member",
) -> wire.InvitePut:
    exp = expires_at if expires_at is not None else now_ms() + 3_600_000
    sealed = crypto.b64e(b"opaque sealed payload " + invite_id.encode())
    digest = hashlib.sha256(sealed.encode()).hexdigest()
    sig = admin.key.sign(
        wire.invite_canonical(admin.mesh_id, invite_id, role, uses, exp, claim.public_hex, digest)
    )
    return wire.InvitePut(
        id="ip-" + invite_id,
        invite_id=invite_id,
        role=role,
        uses=uses,
        expires_at=exp,
        claim_pubkey=claim.public_hex,
        sealed=sealed,
        signature=sig,
    )


def claim(
    mesh_id: str,
    invite_id: str,
    claim_key: crypto.KeyPair,
    member: crypto.KeyPair,
    name: str = "joiner",
) -> wire.InviteClaim:
    ts = now_ms()
    return wire.InviteClaim(
        id="cl",
        mesh_id=mesh_id,
        invite_id=invite_id,
        member_pubkey=member.public_hex,
        display_name=name,
        timestamp=ts,
        signature=claim_key.sign(
            wire.invite_claim_canonical(mesh_id, invite_id, member.public_hex, ts)
        ),
    )


async def test_mesh_create_then_hello_as_admin(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        key = new_key()
        async with open_peer(b.url) as p:
            created = await p.request(mesh_create(key))
            assert isinstance(created, wire.MeshCreated)
            ident = Identity(created.mesh_id, created.member_id, key, "owner")
            bad = mesh_create(key)
            bad.signature = "00" * 64
            err = await p.request(bad)
            assert isinstance(err, wire.Error)
            assert err.code == errors.BAD_SIGNATURE
            old = mesh_create(key)
            old.timestamp -= 120_000
            err = await p.request(old)
            assert isinstance(err, wire.Error)
            assert err.code == errors.TIMESTAMP_SKEW
        async with open_peer(b.url, ident) as owner:
            assert owner.hello_ack is not None
            assert owner.hello_ack.role == "admin"
            assert owner.hello_ack.member_display_name == "owner"


async def test_mesh_create_off_loopback_needs_token(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path, host="0.0.0.0", create_token="s3cret") as b:
        url = b.url
        async with open_peer(url) as p:
            err = await p.request(mesh_create(new_key()))
            assert isinstance(err, wire.Error)
            assert err.code == errors.FORBIDDEN
            err = await p.request(mesh_create(new_key(), create_token="wrong"))
            assert isinstance(err, wire.Error)
            assert err.code == errors.FORBIDDEN
            ok = await p.request(mesh_create(new_key(), create_token="s3cret"))
            assert isinstance(ok, wire.MeshCreated)


async def test_invite_put_claim_and_errors(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        admin = b.member(mesh, "admin", role="admin")
        plain = b.member(mesh, "plain")
        ck = new_key()
        async with open_peer(b.url, admin) as a, open_peer(b.url, plain) as pl:
            ok = await a.request(invite_put(admin, "inv1", ck, uses=1, role="admin"))
            assert isinstance(ok, wire.Ok)
            dup = await a.request(invite_put(admin, "inv1", ck))
            assert isinstance(dup, wire.Error)
            forbidden = await pl.request(invite_put(plain, "inv2", ck))
            assert isinstance(forbidden, wire.Error)
            assert forbidden.code == errors.FORBIDDEN
            forged = invite_put(admin, "inv3", ck)
            forged.uses = 50  # signature no longer covers it
            err = await a.request(forged)
            assert isinstance(err, wire.Error)
            assert err.code == errors.BAD_SIGNATURE
            rv = await pl.request(wire.InviteRevoke(id="rv", invite_id="inv1"))
            assert isinstance(rv, wire.Error)
            assert rv.code == errors.FORBIDDEN
            assert isinstance(
                await a.request(invite_put(admin, "old", ck, expires_at=now_ms() + 300)), wire.Ok
            )
            assert isinstance(await a.request(invite_put(admin, "gone", ck)), wire.Ok)
            assert isinstance(
                await a.request(wire.InviteRevoke(id="rv", invite_id="gone")), wire.Ok
            )
            nf = await a.request(wire.InviteRevoke(id="rv2", invite_id="nope"))
            assert isinstance(nf, wire.Error)
            assert nf.code == errors.INVITE_NOT_FOUND
        joiner = new_key()
        async with open_peer(b.url) as j:
            wrong_key = await j.request(claim(mesh, "inv1", new_key(), joiner))
            assert isinstance(wrong_key, wire.Error)
            assert wrong_key.code == errors.BAD_SIGNATURE
            got = await j.request(claim(mesh, "inv1", ck, joiner, "jo"))
            assert isinstance(got, wire.InviteClaimed)
            assert got.role == "admin"
            assert got.uses == 1
            assert got.admin_pubkey == admin.pubkey
            assert got.claim_pubkey == ck.public_hex
            assert got.sealed == crypto.b64e(b"opaque sealed payload inv1")
            digest = hashlib.sha256(got.sealed.encode()).hexdigest()
            assert crypto.verify(
                got.admin_pubkey,
                wire.invite_canonical(
                    mesh, "inv1", got.role, got.uses, got.expires_at, got.claim_pubkey, digest
                ),
                got.admin_signature,
            )
            again = await j.request(claim(mesh, "inv1", ck, joiner, "jo"))
            assert isinstance(again, wire.InviteClaimed)
            assert again.member_id == got.member_id
            other = await j.request(claim(mesh, "inv1", ck, new_key()))
            assert isinstance(other, wire.Error)
            assert other.code == errors.INVITE_EXHAUSTED
            nf = await j.request(claim(mesh, "missing", ck, new_key()))
            assert isinstance(nf, wire.Error)
            assert nf.code == errors.INVITE_NOT_FOUND
            rv = await j.request(claim(mesh, "gone", ck, new_key()))
            assert isinstance(rv, wire.Error)
            assert rv.code == errors.INVITE_REVOKED
            await trio.sleep(0.35)
            ex = await j.request(claim(mesh, "old", ck, new_key()))
            assert isinstance(ex, wire.Error)
            assert ex.code == errors.INVITE_EXPIRED
            # the joiner is now a member and can say hello on the same connection
            ident = Identity(mesh, got.member_id, joiner, "jo")
            from cmtest.broker import signed_hello

            await j.send(signed_hello(ident))
            ack = await j.expect(wire.HelloAck)
            assert ack.member_display_name == "jo"
            assert ack.role == "admin"


async def test_racing_claims_one_use_exactly_one_wins(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        admin = b.member(mesh, "admin", role="admin")
        ck = new_key()
        async with open_peer(b.url, admin) as a:
            assert isinstance(await a.request(invite_put(admin, "race", ck, uses=1)), wire.Ok)
        results: list[wire.Frame] = []

        async def one(i: int) -> None:
            async with open_peer(b.url) as p:
                results.append(await p.request(claim(mesh, "race", ck, new_key(), f"j{i}")))

        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(one, i)
        wins = [r for r in results if isinstance(r, wire.InviteClaimed)]
        losses = [r for r in results if isinstance(r, wire.Error)]
        assert len(wins) == 1
        assert len(losses) == 7
        assert {e.code for e in losses} == {errors.INVITE_EXHAUSTED}
        members = b.store.db.list_members(mesh)
        assert len(members) == 2


async def test_mesh_create_honours_the_proposed_mesh_id(tmp_path: Path) -> None:
    """The creator derives its key from the mesh id, so the broker keeps its proposal."""
    async with open_inproc_broker(tmp_path) as b:
        key = new_key()
        async with open_peer(b.url) as p:
            created = await p.request(mesh_create(key, mesh_id="proposed-0001"))
            assert isinstance(created, wire.MeshCreated)
            assert created.mesh_id == "proposed-0001"
        async with open_peer(b.url) as p:
            again = await p.request(mesh_create(new_key(), mesh_id="proposed-0001"))
            assert isinstance(again, wire.Error)
            assert again.code == errors.INVALID_FIELD
            assert "taken" in again.message
        async with open_peer(b.url) as p:
            bad = await p.request(mesh_create(new_key(), mesh_id="../etc"))
            assert isinstance(bad, wire.Error)
            assert bad.code == errors.INVALID_FIELD
