"""common.redact: every credential shape a shard URL or pipe: command carries becomes ***; the rest stays."""

import pytest

from common.redact import redact, redacted

SECRET = "hf_abcdefghijklmnopqrstuvwxyz012345"


@pytest.mark.parametrize("text,expected", [
    ("https://user:pa55@host.example/shards/a.tar", "https://***@host.example/shards/a.tar"),
    ("s3://AKIAEXAMPLEKEY:wJalr/XUtnFEMI+K7MDENG@bucket/train", "s3://***@bucket/train"),
    ("https://ghp_tokenonly@github.com/org/repo", "https://***@github.com/org/repo"),
    ("https://b.s3.amazonaws.com/a.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101"
     "&X-Amz-Signature=deadbeef&X-Amz-Security-Token=FwoGZX",
     "https://b.s3.amazonaws.com/a.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
     "&X-Amz-Signature=***&X-Amz-Security-Token=***"),
    ("https://acct.blob.core.windows.net/c/a.tar?sv=2022-11-02&sp=r&sig=abc%2Bdef", 
     "https://acct.blob.core.windows.net/c/a.tar?sv=2022-11-02&sp=r&sig=***"),
    ("https://host/a.tar?token=abc123&page=2", "https://host/a.tar?token=***&page=2"),
    ("https://host/a.tar?access_token=abc123", "https://host/a.tar?access_token=***"),
    (f"pipe:curl -s -H 'Authorization: Bearer {SECRET}' https://hf.co/d/a.tar",
     "pipe:curl -s -H 'Authorization: ***' https://hf.co/d/a.tar"),
    ('pipe:curl -H "Authorization: Basic dXNlcjpwYXNz" https://h/a.tar',
     'pipe:curl -H "Authorization: ***" https://h/a.tar'),
    ("pipe:curl -H 'X-Api-Key: abc123' https://h/a.tar", "pipe:curl -H 'X-Api-Key: ***' https://h/a.tar"),
    (f"pipe:cat /d/a.tar # Authorization: Bearer {SECRET}", "pipe:cat /d/a.tar # Authorization: ***"),
    ("pipe:curl --oauth2-bearer abc123 https://h/a.tar", "pipe:curl --oauth2-bearer *** https://h/a.tar"),
    ("pipe:curl -u alice:s3cret https://h/a.tar", "pipe:curl -u *** https://h/a.tar"),
    ("pipe:curl --user 'alice:s3cret' https://h/a.tar", "pipe:curl --user '***' https://h/a.tar"),
    ("pipe:tool --token abc --password=xyz --api-key 'k k' x", "pipe:tool --token *** --password=*** --api-key '***' x"),
    ("pipe:curl -H 'Cookie: session=a1; csrf=b2' u", "pipe:curl -H 'Cookie: ***' u"),
    ('pipe:PGPASSWORD="two words" psql', 'pipe:PGPASSWORD="***" psql'),
    ("pipe:AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI aws s3 cp s3://b/a.tar -",
     "pipe:AWS_ACCESS_KEY_ID=*** AWS_SECRET_ACCESS_KEY=*** aws s3 cp s3://b/a.tar -"),
    ("pipe:HF_TOKEN=abc GITHUB_TOKEN=def DB_PASSWORD=ghi cat a.tar", "pipe:HF_TOKEN=*** GITHUB_TOKEN=*** DB_PASSWORD=*** cat a.tar"),
    (f"pipe:cat a.tar {SECRET}", "pipe:cat a.tar ***"),
    ("see AKIAIOSFODNN7EXAMPLE and ghp_0123456789abcdefghij and sk-proj-0123456789abcdefgh", "see *** and *** and ***"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", "***"),
])
def test_redact_hides_every_credential_shape(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent


@pytest.mark.parametrize("text", [
    "/data/shards/train", "shards/train-{000000..000099}.tar", "s3://bucket/train/index.json",
    "https://host.example:8443/shards/a.tar?page=2", "pipe:cat /data/a.tar", "gs://b/x", "hf://datasets/org/name",
    "runs/pretrain", "vit_ti16", "supervised", "train.resume_mismatch=allow", "C:/data/x", "",
    "s3://b/x: NoCredentialsError: Unable to locate credentials", "KeyError: 'name'",
])
def test_redact_keeps_what_holds_no_secret(text):
    assert redact(text) == text


def test_redacted_walks_json_values_and_keeps_keys_and_other_types():
    value = {"data": {"train": [f"pipe:curl -H 'Authorization: Bearer {SECRET}' u", "s3://k:s@b/x"],
                      "batch_size": 8, "mean": (0.5, 0.5), "val": None}, "token": True}
    assert redacted(value) == {"data": {"train": ["pipe:curl -H 'Authorization: ***' u", "s3://***@b/x"],
                                        "batch_size": 8, "mean": [0.5, 0.5], "val": None}, "token": True}
