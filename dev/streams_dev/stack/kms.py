"""moto 5.2.6's server as the local KMS (``STREAMS_KMS_ENDPOINT``), with one dev key.

moto keeps everything in memory: a restarted moto has lost every key, so anything
wrapped by a key of its previous run can never be opened again. ``streams stack up``
therefore refuses, in one line, to start a fresh moto while the default key file
(``STREAMS_KEYS_FILE``) is wrapped by a moto key, and says what to remove; and after
starting a fresh moto it wipes the per-user key mode's rows of the dev database
(``STREAMS_PG_DSN``, what ``make run`` uses), which no key of the new moto opens
(``forget_lost_keys``). Each start (and each ``up`` of a running one) makes sure the dev
keys exist: ``alias/streams-dev`` (symmetric) and ``alias/streams-dev-mac`` (HMAC_256), the
per-user key mode that ``make run`` runs (dev/streams_dev/local.env):

    STREAMS_KMS_KEY_ID=alias/streams-dev STREAMS_KMS_MAC_KEY_ID=alias/streams-dev-mac
    STREAMS_KMS_ENDPOINT=http://127.0.0.1:9350

moto decrypts even with a disabled key; ``streams.privacy.kms`` checks the key state
itself (DescribeKey) for that reason.
"""

from __future__ import annotations

import json
import subprocess
import sys

from .process import LOOPBACK, NotReady, Service, StackError, port_open, spawn

DEV_ALIAS = "alias/streams-dev"
DEV_MAC_ALIAS = "alias/streams-dev-mac"
# The dev keys: alias -> CreateKey arguments (an HMAC_256 key for the join keys).
DEV_KEYS = {
    DEV_ALIAS: {},
    DEV_MAC_ALIAS: {"KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC"},
}
# Dev rows that only the keys of the moto run that wrote them open (per-user key mode).
LOST_WITH_KMS = ("user_logins", "sealed_values", "user_data_keys", "key_lifetimes")
MOTO_ACCOUNT = ":123456789012:"  # the account id in every moto ARN


class Kms(Service):
    name = "kms"
    ready_timeout = 60.0

    @property
    def port(self) -> int:
        return self.settings.kms_port

    def ports(self) -> list[tuple[int, str]]:
        return [(self.settings.kms_port, "STREAMS_KMS_PORT")]

    @property
    def marker(self) -> str:
        return str(self.dir)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def detail(self) -> str:
        return f"endpoint {self.endpoint}, dev keys {DEV_ALIAS} {DEV_MAC_ALIAS}, log {self.log_file}"

    def prepare(self) -> None:
        """A fresh moto has no keys: refuse while the dev key file depends on a previous run's."""
        keys_file = self.settings.keys_file
        try:
            doc = json.loads(keys_file.read_text())
        except (OSError, ValueError):
            return
        if isinstance(doc, dict) and MOTO_ACCOUNT in str(doc.get("kms_key_arn", "")):
            raise StackError(
                f"the local KMS starts empty, and {keys_file} is wrapped by a key of its previous run that no "
                f"restarted moto has: remove {keys_file} (the dev rows masked under it can no longer be revealed) "
                "and run `streams stack up` again"
            )

    def forget_lost_keys(self) -> int:
        """After a fresh moto start: delete the dev database's per-user key mode rows.

        Nothing the new moto has opens them (its keys are new), so they would only make
        reveal and ``streams keys seal`` fail. Returns how many rows went; 0 when the
        database is not migrated (or not reachable: nothing there to wipe now).
        """
        import asyncio

        return asyncio.run(self._forget_lost_keys())

    async def _forget_lost_keys(self) -> int:
        import asyncpg

        try:
            conn = await asyncpg.connect(self.settings.pg_dsn.get_secret_value(), timeout=10)
        except (OSError, asyncpg.PostgresError):
            return 0
        try:
            if await conn.fetchval("SELECT to_regclass('sealed_values')") is None:
                return 0
            async with conn.transaction():
                gone = 0
                for table in LOST_WITH_KMS:
                    # user_logins: only the rows written in per-user key mode (tokens of the lost HMAC key)
                    where = (
                        " WHERE message_id IN (SELECT message_id FROM sealed_values)" if table == "user_logins" else ""
                    )
                    status = await conn.execute(f"DELETE FROM {table}{where}")
                    gone += int(status.rsplit(" ", 1)[-1])
            return gone
        finally:
            await conn.close()

    def launch(self) -> subprocess.Popen:
        argv = [sys.executable, "-m", "streams_dev.stack.kms", f"--stack-dir={self.dir}", str(self.port)]
        return spawn(argv, pid_file=self.pid_file, log_file=self.log_file, cwd=self.dir)

    def probe(self, timeout: float) -> None:
        """ListKeys through botocore, then the dev keys (made if missing: idempotent)."""
        if not port_open(self.port):
            raise NotReady(f"port {self.port} not accepting connections yet")
        client = self._client(timeout)
        try:
            client.list_keys(Limit=1)
            aliases = {a["AliasName"] for a in client.list_aliases()["Aliases"]}
            for alias, spec in DEV_KEYS.items():
                if alias not in aliases:
                    key = client.create_key(Description="streams local dev key (moto: lost on restart)", **spec)
                    client.create_alias(AliasName=alias, TargetKeyId=key["KeyMetadata"]["KeyId"])
        except Exception as exc:  # botocore raises many unrelated types; all mean "not yet"
            raise NotReady(f"KMS not answering: {type(exc).__name__}") from None

    def _client(self, timeout: float):
        if getattr(self, "_kms", None) is None:
            import botocore.config
            import botocore.session

            self._kms = botocore.session.get_session().create_client(
                "kms",
                endpoint_url=self.endpoint,
                region_name="us-east-1",
                aws_access_key_id="local",
                aws_secret_access_key="local",
                config=botocore.config.Config(
                    connect_timeout=min(timeout, 5), read_timeout=min(timeout, 10), retries={"max_attempts": 1}
                ),
            )
        return self._kms


def main(argv: list[str]) -> None:
    """``python -m streams_dev.stack.kms --stack-dir=<dir> <port>``: moto's server on loopback.

    The ``--stack-dir`` argument is only the marker that proves the pid is this stack's.
    """
    from moto.server import main as moto_main

    port = argv[-1]
    moto_main(["-H", LOOPBACK, "-p", port])


if __name__ == "__main__":
    main(sys.argv[1:])
