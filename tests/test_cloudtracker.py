"""CloudTracker's own Elasticsearch datasource on an index hindsight-py loaded from a CloudTrail tree.

CloudTracker 2.1.5 (PyPI) with the Elasticsearch 8 Python client and elasticsearch-dsl 8 is
installed at test time into a directory of its own (its pinned requirements would clash with
ours; the datasource needs none of them but ansicolors, jmespath and setuptools' pkg_resources),
cached under ~/.cache/hindsight-py. A script in a subprocess, with only that directory added to
its path, calls `cloudtracker.datasources.es.ElasticSearch` as CloudTracker's `run` does.

The tree: the 310 real records, plus one file of role-session events without errors (in the real
records every event made with an assumed role's keys failed, so CloudTracker, which leaves failed
calls out, would find nothing to report for a user acting in a role).
Cost: the first install about 10 s (then cached); the load about 10 s; the queries about 3 s.
OpenSearch is not covered: the Elasticsearch clients from 7.14 on refuse it, and with an older one
CloudTracker reads OpenSearch's version (2) as Elasticsearch 2 and queries `.raw` fields
(docs/cloudtrail.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import urllib3
from test_cloudtrail_tree import delete_template, example_config, pack_sample_tree, pack_tree, run_hindsight

CLOUDTRACKER = "cloudtracker==2.1.5"
# what its ElasticSearch datasource imports, in versions that fit an Elasticsearch 8 server
DATASOURCE_REQUIREMENTS = ["elasticsearch>=8,<9", "elasticsearch-dsl>=8,<9", "ansicolors", "jmespath",
                           "setuptools<81"]  # pkg_resources, which cloudtracker imports, is gone from 81 on
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hindsight-py" / "cloudtracker-2.1.5-es8"

ROLE = "arn:aws:iam::457448411975:role/stratus-red-team-ec2-get-password-data-role"
USER = "arn:aws:iam::457448411975:user/christophe"
SESSION_KEY = "ASIANQQHHS551LWULIWD"  # from that user's AssumeRole of ROLE in the real records

# Runs CloudTracker's datasource; reads {"url", "index", "users", "roles", "pairs"}, prints the answers.
SCRIPT = r"""
import json, sys
from urllib.parse import urlsplit
from cloudtracker.datasources.es import ElasticSearch

job = json.load(open(sys.argv[1]))
url = urlsplit(job["url"])
# The config dict is also the client's hosts entry, which the 8.x client checks key by key, so the
# index cannot be in it: it is set on the datasource, which reads it from there.
datasource = ElasticSearch({"host": url.hostname, "port": url.port, "scheme": url.scheme},
                           "2000-01-01", "2100-01-01")
datasource.index = job["index"]
answer = {
    "es_version": datasource.es_version,
    "users": sorted(datasource.get_performed_users()),
    "roles": sorted(datasource.get_performed_roles()),
    "by_user": {arn: sorted(datasource.get_performed_event_names_by_user(
        datasource.get_search_query(), {"Arn": arn})) for arn in job["users"]},
    "by_role": {arn: sorted(datasource.get_performed_event_names_by_role(
        datasource.get_search_query(), {"Arn": arn})) for arn in job["roles"]},
    "by_user_in_role": {user + " " + role: sorted(datasource.get_performed_event_names_by_user_in_role(
        datasource.get_search_query(), {"Arn": user}, {"Arn": role})) for user, role in job["pairs"]},
}
print(json.dumps(answer))
"""


@pytest.fixture(scope="session")
def cloudtracker_path() -> Path:
    """A directory holding cloudtracker and a client that fits Elasticsearch 8 (installed once)."""
    if (CACHE / "cloudtracker" / "datasources" / "es.py").exists():
        return CACHE
    staging = CACHE.with_name(CACHE.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", str(staging)]
    for extra in (["--no-deps", CLOUDTRACKER], DATASOURCE_REQUIREMENTS):
        result = subprocess.run(pip + extra, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            pytest.fail(f"cannot install {' '.join(extra)} for the CloudTracker test:\n{result.stderr[-3000:]}")
    shutil.rmtree(CACHE, ignore_errors=True)
    staging.rename(CACHE)
    return CACHE


def role_session_records() -> list[dict[str, Any]]:
    """Calls made with the keys USER got by assuming ROLE, that succeeded."""
    identity = {
        "type": "AssumedRole",
        "principalId": "AROAEXAMPLE:stratus",
        "arn": "arn:aws:sts::457448411975:assumed-role/stratus-red-team-ec2-get-password-data-role/stratus",
        "accountId": "457448411975",
        "accessKeyId": SESSION_KEY,
        "sessionContext": {"sessionIssuer": {"type": "Role", "principalId": "AROAEXAMPLE", "arn": ROLE,
                                             "accountId": "457448411975",
                                             "userName": "stratus-red-team-ec2-get-password-data-role"}},
    }
    return [{
        "eventVersion": "1.09", "userIdentity": identity, "eventTime": f"2024-08-01T13:5{n}:00Z",
        "eventSource": "ec2.amazonaws.com", "eventName": name, "awsRegion": "us-east-1",
        "requestParameters": {}, "responseElements": None, "eventID": f"5e55104e-0000-4000-8000-00000000000{n}",
        "eventType": "AwsApiCall", "recipientAccountId": "457448411975",
    } for n, name in enumerate(["DescribeInstances", "GetPasswordData"])]


def _get(record: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        record = record.get(key) if isinstance(record, dict) else None
    return record


def expected_answers(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What CloudTracker should find, worked out from the records themselves.

    It leaves out failed calls (those with an errorCode) and names an action "service:eventname"
    in lower case, without the API date some names carry (UpdateFunctionCode20150331v2); the
    services here need none of its renames.
    """
    ok = [r for r in records if "errorCode" not in r]

    def action(r: dict[str, Any]) -> str:
        return f"{r['eventSource'].split('.')[0]}:{r['eventName'].lower().split('20')[0]}".lower()

    by_user: dict[str, set[str]] = defaultdict(set)
    by_role: dict[str, set[str]] = defaultdict(set)
    keys: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in ok:
        if r["userIdentity"].get("type") == "IAMUser":
            by_user[r["userIdentity"]["arn"]].add(action(r))
        issuer = _get(r, "userIdentity.sessionContext.sessionIssuer.arn")
        if issuer:
            by_role[issuer].add(action(r))
        if r["eventName"] == "AssumeRole" and _get(r, "requestParameters.roleArn"):
            keys[(r["userIdentity"]["arn"], r["requestParameters"]["roleArn"])].add(
                r["responseElements"]["credentials"]["accessKeyId"])
    in_role = {f"{user} {role}": sorted({action(r) for r in ok if r["userIdentity"].get("accessKeyId") in ks
                                         and _get(r, "userIdentity.sessionContext.sessionIssuer.arn") == role})
               for (user, role), ks in keys.items()}
    return {
        "users": sorted({r["userIdentity"]["userName"] for r in ok if r["userIdentity"].get("userName")}),
        "roles": sorted({_get(r, "userIdentity.sessionContext.sessionIssuer.userName") for r in ok}
                        - {None}),
        "by_user": {arn: sorted(v) for arn, v in by_user.items()},
        "by_role": {arn: sorted(v) for arn, v in by_role.items()},
        "by_user_in_role": in_role,
        "pairs": sorted(keys),
    }


@pytest.mark.servers
def test_cloudtracker_finds_the_users_roles_and_actions_in_the_index(es8_url, scratch_index, cloudtracker_path,
                                                                   tmp_path):
    tree = tmp_path / "tree"
    records, _ = pack_sample_tree(tree)
    extra = role_session_records()
    pack_tree(tree, [extra], seed=11)
    records += extra
    index = scratch_index(es8_url)
    work = example_config(tmp_path, root=tree, url=es8_url, index=index)
    try:
        loaded = run_hindsight(work)
        assert loaded.returncode == 16, loaded.stderr  # the corrupt archive of the sample tree
        # the documents are indexed; make them searchable before CloudTracker asks (refresh is ~1 s lazy)
        refreshed = urllib3.request("POST", f"{es8_url}/{index}-*/_refresh")
        assert refreshed.status == 200, refreshed.data
        expected = expected_answers(records)
        assert expected["by_user_in_role"][f"{USER} {ROLE}"] == ["ec2:describeinstances", "ec2:getpassworddata"]
        job = tmp_path / "job.json"
        # the alias the template puts on every daily index (in the example: "cloudtrail", CloudTracker's default)
        job.write_text(json.dumps({"url": es8_url, "index": f"{index}-all", "users": sorted(expected["by_user"]),
                                   "roles": sorted(expected["by_role"]), "pairs": expected["pairs"]}))
        script = tmp_path / "cloudtracker_queries.py"
        script.write_text(SCRIPT)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["PYTHONPATH"] = str(cloudtracker_path)
        ran = subprocess.run([sys.executable, "-s", str(script), str(job)], capture_output=True, text=True,
                             env=env, timeout=300, stdin=subprocess.DEVNULL)
        assert ran.returncode == 0, ran.stderr
        answer = json.loads(ran.stdout.strip().splitlines()[-1])
    finally:
        delete_template(es8_url, index)

    assert answer["es_version"] == 8
    assert answer["users"] == expected["users"]
    assert answer["roles"] == expected["roles"]
    assert "christophe" in answer["users"] and "test-role" in answer["roles"]
    assert answer["by_user"] == expected["by_user"]
    assert answer["by_role"] == expected["by_role"]
    assert answer["by_user_in_role"] == expected["by_user_in_role"]
