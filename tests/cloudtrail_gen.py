#!/usr/bin/env python3
"""Synthetic CloudTrail records, one compact JSON object a line (what `jq -cr '.Records[]'` makes of
CloudTrail's files, and what CloudTracker's run/input/file.cfg reads).

    python3 tests/cloudtrail_gen.py -n 200000 -o cloudtrail.ndjson [--seed 20240101]

Used by the tests (imported, or run as above) and by benchmarks/run.py. What they rely on:
- the same seed and count give the same bytes, on any machine and Python 3.11+;
- every record has a unique `eventID` (a UUID whose low 48 bits are the record's sequence number),
  `eventTime` (ISO 8601, UTC, never decreasing), `awsRegion` and `recipientAccountId`;
- lines average about 1.2 KB (from about 0.5 KB to a few KB), none holds a newline;
- every field path keeps one JSON type and one string shape in all records, so that an index with
  Elasticsearch's dynamic mapping (date detection on) takes every record: only dates look like dates;
- `sourceIPAddress` is mostly IPv4, sometimes IPv6, an AWS service's host name or "AWS Internal",
  as in real trails (an index that maps it as `ip` rejects those records);
- a few hundred distinct field paths, well under `index.mapping.total_fields.limit` (1,000).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

DEFAULT_SEED = 20240101
START = datetime(2024, 1, 1, tzinfo=UTC)

ACCOUNTS = ("111122223333", "444455556666", "777788889999", "123412341234")
REGIONS = ("us-east-1", "us-east-2", "us-west-2", "eu-west-1", "eu-west-3", "eu-central-1", "ap-south-1",
           "ap-northeast-1", "ca-central-1")
PEOPLE = ("amara", "bogdan", "chen", "dalia", "emeka", "farah", "goran", "hana", "ines", "jonas", "keiko",
          "lars", "mina", "nadia", "omar", "pilar")
ROLES = ("deploy-pipeline", "BreakGlassAdmin", "SecurityAudit", "data-lake-reader", "eks-node-role",
         "lambda-ingest", "OrganizationAccountAccessRole", "terraform-apply")
SERVICES_AS_CALLERS = ("ec2.amazonaws.com", "lambda.amazonaws.com", "cloudformation.amazonaws.com",
                       "ssm.amazonaws.com", "elasticloadbalancing.amazonaws.com")
USER_AGENTS = (
    "aws-cli/2.15.30 Python/3.11.8 Linux/6.1.79-99.164.amzn2023.x86_64 exe/x86_64.amzn.2023 prompt/off command/ec2.describe-instances",
    "aws-cli/1.29.62 Python/3.9.16 Darwin/23.2.0 botocore/1.31.62",
    "Boto3/1.34.51 md/Botocore#1.34.51 ua/2.0 os/linux#5.10.210-201.852.amzn2.x86_64 lang/python#3.12.2 Botocore/1.34.51",
    "aws-sdk-go-v2/1.25.2 os/linux lang/go#1.22.0 md/GOOS#linux md/GOARCH#amd64 api/ec2#1.149.1",
    "aws-sdk-java/2.25.6 Linux/5.15.0-1055-aws OpenJDK_64-Bit_Server_VM/17.0.10+7-LTS Java/17.0.10",
    "APN/1.0 HashiCorp/1.0 Terraform/1.7.4 (+https://www.terraform.io) terraform-provider-aws/5.40.0 aws-sdk-go/1.51.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/122.0.0.0 Safari/537.36",
    "AWS Internal",
    "ssm.amazonaws.com",
    "cloudformation.amazonaws.com",
)
BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
HEX = "0123456789abcdef"
TOKEN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


class Generator:
    """Records from one seeded random stream; `record(seq)` must be called with 0, 1, 2, ..."""

    def __init__(self, seed: int = DEFAULT_SEED) -> None:
        self.rng = random.Random(seed)
        self.when = START
        self.events: list[tuple[str, str, bool, Callable[[str, str], tuple[Any, Any]]]] = [
            ("ec2", "DescribeInstances", True, self._describe_instances),
            ("ec2", "RunInstances", False, self._run_instances),
            ("ec2", "StopInstances", False, self._stop_instances),
            ("ec2", "AuthorizeSecurityGroupIngress", False, self._ingress),
            ("ec2", "DescribeVolumes", True, self._describe_volumes),
            ("s3", "GetBucketPolicy", True, self._bucket),
            ("s3", "PutBucketPolicy", False, self._put_bucket_policy),
            ("s3", "ListBuckets", True, self._nothing),
            ("iam", "CreateAccessKey", False, self._create_access_key),
            ("iam", "GetRole", True, self._get_role),
            ("iam", "PutRolePolicy", False, self._put_role_policy),
            ("iam", "ListUsers", True, self._paged),
            ("sts", "AssumeRole", False, self._assume_role),
            ("sts", "GetCallerIdentity", True, self._nothing),
            ("kms", "Decrypt", True, self._decrypt),
            ("lambda", "ListFunctions20150331", True, self._paged),
            ("lambda", "UpdateFunctionCode20150331v2", False, self._update_function),
            ("logs", "CreateLogGroup", False, self._log_group),
            ("dynamodb", "DescribeTable", True, self._table),
            ("ssm", "GetParameter", True, self._parameter),
            ("cloudtrail", "LookupEvents", True, self._lookup_events),
            ("signin", "ConsoleLogin", False, self._nothing),
        ]
        # reads outnumber writes in real trails
        self.weights = [3 if read_only else 1 for _, _, read_only, _ in self.events]

    # -- small pieces ---------------------------------------------------------------------------
    def text(self, alphabet: str, length: int) -> str:
        return "".join(self.rng.choices(alphabet, k=length))

    def hex_id(self, prefix: str, length: int = 17) -> str:
        return prefix + self.text(HEX, length)

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def stamp(self, when: datetime) -> str:
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")

    def source_ip(self) -> str:
        draw = self.rng.random()
        if draw < 0.80:
            octets = (self.rng.choice((3, 18, 34, 52, 54, 81, 93, 104, 145, 176, 198, 203)),
                      *(self.rng.randrange(256) for _ in range(2)), self.rng.randrange(1, 255))
            return ".".join(map(str, octets))
        if draw < 0.84:
            return "2001:db8:" + ":".join(f"{self.rng.randrange(65536):x}" for _ in range(6))
        if draw < 0.96:
            return self.rng.choice(SERVICES_AS_CALLERS)
        return "AWS Internal"

    def identity(self, account: str) -> tuple[dict[str, Any], str]:
        """(userIdentity, a name for messages)."""
        kind = self.rng.choices(("IAMUser", "AssumedRole", "AWSService", "Root"), (36, 40, 21, 3))[0]
        if kind == "IAMUser":
            person = self.rng.choice(PEOPLE)
            return {"type": "IAMUser", "principalId": "AIDA" + self.text(BASE32, 17),
                    "arn": f"arn:aws:iam::{account}:user/{person}", "accountId": account,
                    "accessKeyId": "AKIA" + self.text(BASE32, 16), "userName": person}, person
        if kind == "AssumedRole":
            role = self.rng.choice(ROLES)
            session = self.rng.choice((self.rng.choice(PEOPLE), "i-" + self.text(HEX, 17),
                                       f"botocore-session-{self.rng.randrange(10**9, 10**10)}"))
            role_id = "AROA" + self.text(BASE32, 17)
            identity = {
                "type": "AssumedRole", "principalId": f"{role_id}:{session}",
                "arn": f"arn:aws:sts::{account}:assumed-role/{role}/{session}", "accountId": account,
                "accessKeyId": "ASIA" + self.text(BASE32, 16),
                "sessionContext": {
                    "sessionIssuer": {"type": "Role", "principalId": role_id,
                                      "arn": f"arn:aws:iam::{account}:role/{role}", "accountId": account,
                                      "userName": role},
                    "webIdFederationData": {},
                    "attributes": {"creationDate": self.stamp(self.when - timedelta(seconds=self.rng.randrange(
                        60, 43200))), "mfaAuthenticated": self.rng.choice(("false", "true"))},
                },
            }
            if self.rng.random() < 0.25:
                identity["invokedBy"] = self.rng.choice(SERVICES_AS_CALLERS)
            return identity, session
        if kind == "AWSService":
            service = self.rng.choice(SERVICES_AS_CALLERS)
            return {"type": "AWSService", "invokedBy": service}, service
        return {"type": "Root", "principalId": account, "arn": f"arn:aws:iam::{account}:root",
                "accountId": account, "accessKeyId": "ASIA" + self.text(BASE32, 16)}, "root"

    def policy(self, account: str) -> str:
        """An IAM policy document, as CloudTrail records it: a JSON string."""
        actions = ("s3:GetObject", "s3:PutObject", "s3:ListBucket", "kms:Decrypt", "kms:GenerateDataKey",
                   "logs:CreateLogStream", "logs:PutLogEvents", "dynamodb:Query", "sqs:ReceiveMessage")
        statements = [{"Sid": f"S{n}{self.text(HEX, 6)}", "Effect": self.rng.choice(("Allow", "Allow", "Deny")),
                       "Action": self.rng.sample(actions, self.rng.randint(1, 5)),
                       "Resource": [f"arn:aws:s3:::{self.hex_id('data-', 10)}/*"
                                    for _ in range(self.rng.randint(1, 3))],
                       "Condition": {"StringEquals": {"aws:PrincipalAccount": account}}}
                      for n in range(self.rng.randint(1, 3))]
        return json.dumps({"Version": "2012-10-17", "Statement": statements}, separators=(",", ":"))

    # -- per event: (requestParameters, responseElements) ------------------------------------------
    def _nothing(self, account: str, region: str) -> tuple[Any, Any]:
        return None, None

    def _describe_instances(self, account: str, region: str) -> tuple[Any, Any]:
        ids = [{"instanceId": self.hex_id("i-")} for _ in range(self.rng.randint(0, 4))]
        request = {"instancesSet": {"items": ids}, "filterSet": {"items": [
            {"name": "tag:team", "valueSet": {"items": [{"value": self.rng.choice(("payments", "search", "infra"))}]}}]}}
        if self.rng.random() < 0.4:
            request["maxResults"] = self.rng.choice((20, 100, 1000))
        return request, None

    def _instance(self, region: str, index: int) -> dict[str, Any]:
        return {"instanceId": self.hex_id("i-"), "imageId": self.hex_id("ami-"), "amiLaunchIndex": index,
                "instanceState": {"code": 0, "name": "pending"}, "instanceType": "m6i.large",
                "privateDnsName": f"ip-10-{self.rng.randrange(256)}-{self.rng.randrange(256)}-"
                                  f"{self.rng.randrange(1, 255)}.{region}.compute.internal",
                "launchTime": self.rng.randrange(1_700_000_000_000, 1_710_000_000_000),
                "placement": {"availabilityZone": region + self.rng.choice("abc"), "tenancy": "default"},
                "subnetId": self.hex_id("subnet-"), "vpcId": self.hex_id("vpc-"),
                "monitoring": {"state": "disabled"}, "ebsOptimized": True}

    def _run_instances(self, account: str, region: str) -> tuple[Any, Any]:
        count = self.rng.randint(1, 2)
        request = {"instancesSet": {"items": [{"imageId": self.hex_id("ami-"), "minCount": 1, "maxCount": count}]},
                   "instanceType": self.rng.choice(("t3.small", "m6i.large", "c7g.xlarge", "r6i.2xlarge")),
                   "blockDeviceMapping": {"items": [{"deviceName": "/dev/xvda", "ebs": {
                       "volumeSize": self.rng.choice((8, 30, 200)), "deleteOnTermination": True,
                       "volumeType": "gp3", "encrypted": True}}]},
                   "monitoring": {"enabled": self.rng.random() < 0.5}, "disableApiTermination": False,
                   "clientToken": self.uuid(), "subnetId": self.hex_id("subnet-"),
                   "tagSpecificationSet": {"items": [{"resourceType": "instance", "tags": [
                       {"key": "Name", "value": "worker-" + self.text(HEX, 6)}]}]}}
        response = {"requestId": self.uuid(), "reservationId": self.hex_id("r-"), "ownerId": account,
                    "groupSet": {}, "instancesSet": {"items": [self._instance(region, i) for i in range(count)]}}
        return request, response

    def _stop_instances(self, account: str, region: str) -> tuple[Any, Any]:
        ids = [self.hex_id("i-") for _ in range(self.rng.randint(1, 6))]
        request = {"instancesSet": {"items": [{"instanceId": i} for i in ids]}, "force": False}
        response = {"requestId": self.uuid(), "instancesSet": {"items": [
            {"instanceId": i, "currentState": {"code": 64, "name": "stopping"},
             "previousState": {"code": 16, "name": "running"}} for i in ids]}}
        return request, response

    def _ingress(self, account: str, region: str) -> tuple[Any, Any]:
        ports = self.rng.sample((22, 443, 3389, 5432, 6379, 8443, 9200), self.rng.randint(1, 3))
        request = {"groupId": self.hex_id("sg-"), "ipPermissions": {"items": [
            {"ipProtocol": "tcp", "fromPort": p, "toPort": p, "groups": {}, "ipv6Ranges": {}, "prefixListIds": {},
             "ipRanges": {"items": [{"cidrIp": f"{self.rng.randrange(1, 224)}.{self.rng.randrange(256)}.0.0/16"}]}}
            for p in ports]}}
        response = {"requestId": self.uuid(), "_return": True, "securityGroupRuleSet": {"items": [
            {"groupOwnerId": account, "groupId": request["groupId"], "securityGroupRuleId": self.hex_id("sgr-"),
             "isEgress": False, "ipProtocol": "tcp", "fromPort": p, "toPort": p} for p in ports]}}
        return request, response

    def _describe_volumes(self, account: str, region: str) -> tuple[Any, Any]:
        return {"volumeSet": {"items": [{"volumeId": self.hex_id("vol-")} for _ in range(self.rng.randint(1, 4))]},
                "filterSet": {}}, None

    def _bucket(self, account: str, region: str) -> tuple[Any, Any]:
        return {"bucketName": self.hex_id("logs-", 12), "Host": f"s3.{region}.amazonaws.com", "policy": ""}, None

    def _put_bucket_policy(self, account: str, region: str) -> tuple[Any, Any]:
        return {"bucketName": self.hex_id("logs-", 12), "Host": f"s3.{region}.amazonaws.com", "policy": "",
                "bucketPolicy": self.policy(account)}, None

    def _create_access_key(self, account: str, region: str) -> tuple[Any, Any]:
        person = self.rng.choice(PEOPLE)
        return {"userName": person}, {"accessKey": {"userName": person, "accessKeyId": "AKIA" + self.text(BASE32, 16),
                                                    "status": "Active", "createDate": "Mar 4, 2024, 9:12:55 AM"}}

    def _get_role(self, account: str, region: str) -> tuple[Any, Any]:
        return {"roleName": self.rng.choice(ROLES)}, None

    def _put_role_policy(self, account: str, region: str) -> tuple[Any, Any]:
        return {"roleName": self.rng.choice(ROLES), "policyName": "inline-" + self.text(HEX, 8),
                "policyDocument": self.policy(account)}, None

    def _paged(self, account: str, region: str) -> tuple[Any, Any]:
        request: dict[str, Any] = {"maxItems": self.rng.choice((50, 100, 1000))}
        if self.rng.random() < 0.35:
            request["marker"] = self.text(TOKEN, self.rng.randint(60, 240))
        return request, None

    def _assume_role(self, account: str, region: str) -> tuple[Any, Any]:
        session = f"{self.rng.choice(PEOPLE)}-{self.text(HEX, 8)}"
        role = f"arn:aws:iam::{self.rng.choice(ACCOUNTS)}:role/{self.rng.choice(ROLES)}"
        request = {"roleArn": role, "roleSessionName": session,
                   "durationSeconds": self.rng.choice((900, 3600, 43200))}
        response = {"credentials": {"accessKeyId": "ASIA" + self.text(BASE32, 16),
                                    "sessionToken": self.text(TOKEN, self.rng.randint(250, 600)),
                                    "expiration": "Mar 4, 2024, 10:12:55 PM"},
                    "assumedRoleUser": {"assumedRoleId": "AROA" + self.text(BASE32, 17) + ":" + session,
                                        "arn": f"arn:aws:sts::{account}:assumed-role/{role.rsplit('/', 1)[1]}/{session}"}}
        return request, response

    def _decrypt(self, account: str, region: str) -> tuple[Any, Any]:
        return {"encryptionAlgorithm": "SYMMETRIC_DEFAULT", "encryptionContext": {
            "aws:lambda:FunctionArn": f"arn:aws:lambda:{region}:{account}:function:{self.hex_id('fn-', 8)}"}}, None

    def _update_function(self, account: str, region: str) -> tuple[Any, Any]:
        name = self.hex_id("fn-", 8)
        request = {"functionName": name, "publish": True, "dryRun": False,
                   "s3Bucket": self.hex_id("artifacts-", 10), "s3Key": f"builds/{self.text(HEX, 12)}.zip"}
        response = {"functionName": name, "functionArn": f"arn:aws:lambda:{region}:{account}:function:{name}",
                    "runtime": "python3.12", "handler": "app.handler", "codeSize": self.rng.randrange(10**4, 10**7),
                    "timeout": 30, "memorySize": self.rng.choice((128, 512, 1024)), "version": "$LATEST",
                    "codeSha256": self.text(TOKEN, 43) + "=", "lastModified": self.stamp(self.when),
                    "tracingConfig": {"mode": "PassThrough"}, "revisionId": self.uuid(), "state": "Active"}
        return request, response

    def _log_group(self, account: str, region: str) -> tuple[Any, Any]:
        return {"logGroupName": f"/aws/lambda/{self.hex_id('fn-', 8)}"}, None

    def _table(self, account: str, region: str) -> tuple[Any, Any]:
        return {"tableName": self.hex_id("orders-", 6)}, None

    def _parameter(self, account: str, region: str) -> tuple[Any, Any]:
        return {"name": f"/{self.rng.choice(('prod', 'staging'))}/db/password", "withDecryption": True}, None

    def _lookup_events(self, account: str, region: str) -> tuple[Any, Any]:
        return {"maxResults": 50, "lookupAttributes": [
            {"attributeKey": "EventName", "attributeValue": self.rng.choice(self.events)[1]}]}, None

    # -- records ----------------------------------------------------------------------------------
    def record(self, seq: int) -> dict[str, Any]:
        rng = self.rng
        self.when += timedelta(milliseconds=rng.randrange(3000))
        account, region = rng.choice(ACCOUNTS), rng.choice(REGIONS)
        service, name, read_only, build = rng.choices(self.events, self.weights)[0]
        identity, who = self.identity(account)
        request, response = build(account, region)
        event_id = uuid.UUID(int=(rng.getrandbits(128) >> 48 << 48) | seq, version=4)
        record: dict[str, Any] = {
            "eventVersion": rng.choice(("1.08", "1.09", "1.10")),
            "userIdentity": identity,
            "eventTime": self.stamp(self.when),
            "eventSource": f"{service}.amazonaws.com",
            "eventName": name,
            "awsRegion": region,
            "sourceIPAddress": self.source_ip(),
            "userAgent": rng.choice(USER_AGENTS),
            "requestParameters": request,
            "responseElements": response,
            "requestID": self.uuid() if rng.random() < 0.75 else self.text(HEX.upper(), 16),
            "eventID": str(event_id),
            "readOnly": read_only,
            "eventType": "AwsConsoleSignIn" if name == "ConsoleLogin" else "AwsApiCall",
            "managementEvent": True,
            "recipientAccountId": account,
            "eventCategory": "Management",
        }
        if name == "ConsoleLogin":
            record["responseElements"] = {"ConsoleLogin": rng.choice(("Success", "Success", "Failure"))}
            record["additionalEventData"] = {"LoginTo": "https://console.aws.amazon.com/console/home",
                                             "MobileVersion": "No", "MFAUsed": rng.choice(("Yes", "No"))}
        elif rng.random() < 0.1:
            record["errorCode"] = rng.choice(("AccessDenied", "Client.UnauthorizedOperation", "ThrottlingException"))
            record["errorMessage"] = (f"User: {identity.get('arn', who)} is not authorized to perform: "
                                      f"{service}:{name} because no identity-based policy allows the action")
            record["responseElements"] = None
        if service != "signin" and rng.random() < 0.6:
            record["tlsDetails"] = {"tlsVersion": rng.choice(("TLSv1.2", "TLSv1.3")),
                                    "cipherSuite": rng.choice(("ECDHE-RSA-AES128-GCM-SHA256", "TLS_AES_128_GCM_SHA256")),
                                    "clientProvidedHostHeader": f"{service}.{region}.amazonaws.com"}
        if rng.random() < 0.12:
            record["resources"] = [{"accountId": account, "type": f"AWS::{service.upper()}::Resource",
                                    "ARN": f"arn:aws:{service}:{region}:{account}:{self.text(HEX, 12)}"}
                                   for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.05:
            record["sharedEventID"] = self.uuid()
        if service == "s3" or rng.random() < 0.08:
            # the signature details S3 and SigV4 callers log, which bring short records up to size
            record["additionalEventData"] = {**record.get("additionalEventData", {}),
                                             "SignatureVersion": "SigV4", "AuthenticationMethod": "AuthHeader",
                                             "x-amz-id-2": self.text(TOKEN, 76),
                                             "bytesTransferredIn": rng.randrange(5000), "bytesTransferredOut": 0}
        return record

    def records(self, count: int) -> Iterator[dict[str, Any]]:
        for seq in range(count):
            yield self.record(seq)


def lines(count: int, seed: int = DEFAULT_SEED) -> Iterator[bytes]:
    """`count` records as compact JSON lines (newline excluded)."""
    for record in Generator(seed).records(count):
        yield json.dumps(record, separators=(",", ":")).encode()


def write(path: Path, count: int, seed: int = DEFAULT_SEED) -> Path:
    with path.open("wb") as out:
        for line in lines(count, seed):
            out.write(line + b"\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000, help="how many records (default 200000)")
    parser.add_argument("-o", default="-", help="output file (default: standard output)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    if args.o == "-":
        for line in lines(args.n, args.seed):
            sys.stdout.buffer.write(line + b"\n")
    else:
        write(Path(args.o), args.n, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
