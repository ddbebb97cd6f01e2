"""The chart and the driver agree on what a valid lvm device class is.

A device class the chart accepted but the driver refuses would surface as a crash-looping node
pod instead of a failed `helm install`; one the chart refused but the driver takes would keep a
documented setting out of reach. Every row of the table below goes through both sides: `helm
template` (values.schema.json and the chart's own checks) and the driver's parser
(csi_driver.config.device_classes.parse_device_classes), and both must give the row's verdict.
When both accept, the ConfigMap the chart renders must parse to exactly the classes the values
describe, so no setting is dropped or altered on the way.

A few rows are marked "chart stricter": spellings the driver tolerates (numbers written as
strings, unusual quantity forms) that the schema refuses because it cannot bound them; they
fail at `helm install`, which is the safe direction.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from csi_driver.config.device_classes import DeviceClass, DeviceClassError, parse_device_classes
from tests.chart.chartlib import CHART, ChartTools, Rendered, parse, run, set_args

OK, BAD, STRICTER = "ok", "bad", "chart stricter"

VG = {"name": "a", "volumeGroup": "vg"}
THIN = {"name": "t", "volumeGroup": "vg", "thinPool": "pool"}


def one(**fields: Any) -> list[dict[str, Any]]:
    """A single class: the minimal one with fields added (None removes a key)."""
    cls = {**VG, **fields}
    return [{k: v for k, v in cls.items() if v is not None}]


def thin(**fields: Any) -> list[dict[str, Any]]:
    return [{**THIN, **fields}]


ROWS: list[tuple[str, list[dict[str, Any]], str]] = [
    # names
    ("minimal", one(), OK),
    ("dotted-name", one(name="fast.nvme"), OK),
    ("63-char-name", one(name="a" * 63), OK),
    ("64-char-name", one(name="a" * 64), BAD),
    ("upper-case-name", one(name="Fast"), BAD),
    ("underscore-name", one(name="a_b"), BAD),
    ("leading-dash-name", one(name="-a"), BAD),
    ("empty-name", one(name=""), BAD),
    ("unknown-key", one(lvtype="linear"), BAD),
    # volume groups and thin pools: lvm2 names
    ("vg-punctuation", one(volumeGroup="vg_data+1.x-y"), OK),
    ("vg-127-chars", one(volumeGroup="v" * 127), OK),
    ("vg-128-chars", one(volumeGroup="v" * 128), BAD),
    ("vg-empty", one(volumeGroup=""), BAD),
    ("vg-leading-dash", one(volumeGroup="-vg"), BAD),
    ("vg-leading-dot", one(volumeGroup=".vg"), BAD),
    ("vg-dotdot", one(volumeGroup=".."), BAD),
    ("vg-slash", one(volumeGroup="vg/x"), BAD),
    ("thin-pool", thin(), OK),
    ("thin-pool-empty", one(thinPool=""), OK),
    ("thin-pool-null", [{**VG, "thinPool": None}], OK),
    ("thin-pool-bad", one(thinPool="-pool"), BAD),
    ("thin-pool-number", one(thinPool=5), STRICTER),
    # default
    ("default-true", one(default=True), OK),
    ("single-class-not-default", one(default=False), OK),
    ("default-string", one(default="yes"), BAD),
    (
        "two-classes-one-default",
        [{**VG, "default": True}, {"name": "b", "volumeGroup": "vg2"}],
        OK,
    ),
    ("two-classes-no-default", [VG, {"name": "b", "volumeGroup": "vg2"}], BAD),
    (
        "two-defaults",
        [{**VG, "default": True}, {"name": "b", "volumeGroup": "vg2", "default": True}],
        BAD,
    ),
    ("duplicate-names", [{**VG, "default": True}, {**VG, "volumeGroup": "vg2"}], BAD),
    ("no-classes", [], BAD),
    # overprovisionRatio: thin pools only, 1 to 100
    ("ratio-thin", thin(overprovisionRatio=4.5), OK),
    ("ratio-100", thin(overprovisionRatio=100), OK),
    ("ratio-101", thin(overprovisionRatio=101), BAD),
    ("ratio-below-one", thin(overprovisionRatio=0.5), BAD),
    ("ratio-one-thick", one(overprovisionRatio=1), OK),
    ("ratio-null", [{**VG, "overprovisionRatio": None}], OK),
    ("ratio-without-pool", one(overprovisionRatio=2), BAD),
    ("ratio-bool", thin(overprovisionRatio=True), BAD),
    ("ratio-string", thin(overprovisionRatio="2"), BAD),
    # reservedBytes: bytes or a quantity
    ("reserved-quantity", one(reservedBytes="10Gi"), OK),
    ("reserved-decimal-quantity", one(reservedBytes="500M"), OK),
    ("reserved-integer", one(reservedBytes=1073741824), OK),
    ("reserved-integer-string", one(reservedBytes="1073741824"), OK),
    ("reserved-zero", one(reservedBytes=0), OK),
    ("reserved-null", [{**VG, "reservedBytes": None}], OK),
    ("reserved-empty", one(reservedBytes=""), OK),
    ("reserved-thin", thin(reservedBytes="1Gi"), OK),
    ("reserved-GB", one(reservedBytes="10GB"), BAD),
    ("reserved-fraction", one(reservedBytes="1.5Gi"), BAD),
    ("reserved-float", one(reservedBytes=1.5), BAD),
    ("reserved-negative", one(reservedBytes=-1), BAD),
    ("reserved-negative-string", one(reservedBytes="-1"), BAD),
    ("reserved-words", one(reservedBytes="ten"), BAD),
    ("reserved-padded", one(reservedBytes=" 10Gi"), STRICTER),
    # lvType: what the driver can create
    ("lvtype-linear", one(lvType="linear"), OK),
    ("lvtype-striped", one(lvType="striped"), OK),
    ("lvtype-raid1", one(lvType="raid1"), OK),
    ("lvtype-thin", thin(lvType="thin"), OK),
    ("lvtype-linear-with-pool", thin(lvType="linear"), OK),
    ("lvtype-empty", one(lvType=""), OK),
    ("lvtype-thin-without-pool", one(lvType="thin"), BAD),
    ("lvtype-raid5", one(lvType="raid5"), BAD),
    ("lvtype-mirror", one(lvType="mirror"), BAD),
    ("lvtype-upper-case", one(lvType="Thin"), BAD),
    # stripes, stripeSize, mirrors: per-class defaults for striped and raid1 volumes
    ("striped", one(lvType="striped", stripes=4, stripeSize="64Ki"), OK),
    ("stripes-128", one(stripes=128), OK),
    ("stripes-zero", one(stripes=0), OK),
    ("stripes-one", one(stripes=1), BAD),
    ("stripes-129", one(stripes=129), BAD),
    ("stripes-fraction", one(stripes=2.5), BAD),
    ("stripes-bool", one(stripes=True), BAD),
    ("stripes-string", one(stripes="4"), STRICTER),
    ("stripe-size-bytes", one(stripeSize=65536), OK),
    ("stripe-size-4Ki", one(stripeSize="4Ki"), OK),
    ("stripe-size-1Mi", one(stripeSize="1Mi"), OK),
    ("stripe-size-4Gi", one(stripeSize="4Gi"), OK),
    ("stripe-size-2Ki", one(stripeSize="2Ki"), BAD),
    ("stripe-size-3Ki", one(stripeSize="3Ki"), BAD),
    ("stripe-size-decimal", one(stripeSize="64k"), BAD),
    ("stripe-size-not-power", one(stripeSize=6144), BAD),
    ("stripe-size-KB", one(stripeSize="64KB"), BAD),
    ("stripe-size-1024Ki", one(stripeSize="1024Ki"), STRICTER),
    ("mirrors", one(lvType="raid1", mirrors=1), OK),
    ("mirrors-4", one(mirrors=4), OK),
    ("mirrors-zero", one(mirrors=0), OK),
    ("mirrors-5", one(mirrors=5), BAD),
    ("mirrors-negative", one(mirrors=-1), BAD),
    ("mirrors-string", one(mirrors="1"), STRICTER),
    # the chart's own key is not part of the driver's format
    ("with-storage-class", one(storageClass={"name": "x", "fsType": "xfs"}), OK),
]


def _driver_view(classes: list[dict[str, Any]]) -> list[DeviceClass] | DeviceClassError:
    """What the driver makes of the classes as written in values (minus the chart's key)."""
    entries = [{k: v for k, v in c.items() if k != "storageClass"} for c in classes]
    try:
        return parse_device_classes({"deviceClasses": entries})
    except DeviceClassError as exc:
        return exc


def _helm(chart_tools: ChartTools, classes: list[dict[str, Any]]) -> tuple[bool, str]:
    values = {"backend": "lvm", "lvm": {"deviceClasses": classes}}
    proc = run([chart_tools.helm, "template", "x", CHART, *set_args(values)])
    return proc.returncode == 0, proc.stdout if proc.returncode == 0 else proc.stderr


def test_the_table_covers_both_verdicts() -> None:
    names = [row[0] for row in ROWS]
    assert len(names) == len(set(names))
    assert {verdict for _, _, verdict in ROWS} == {OK, BAD, STRICTER}


@pytest.mark.parametrize(
    ("classes", "verdict"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS]
)
def test_chart_and_driver_agree(
    chart_tools: ChartTools, classes: list[dict[str, Any]], verdict: str
) -> None:
    driver = _driver_view(classes)
    chart_ok, output = _helm(chart_tools, classes)
    driver_ok = not isinstance(driver, DeviceClassError)
    want_chart, want_driver = {OK: (True, True), BAD: (False, False), STRICTER: (False, True)}[
        verdict
    ]
    assert driver_ok == want_driver, f"driver: {driver}"
    assert chart_ok == want_chart, f"helm template: {output[-2000:]}"
    if not chart_ok:
        # Refused by the schema or the chart's checks, naming the setting.
        assert "deviceClasses" in output, output[-2000:]
        return
    assert isinstance(driver, list)
    config_map = Rendered(parse(output)).one("ConfigMap", "-lvm")
    rendered = json.loads(config_map["data"]["lvm.json"])
    assert parse_device_classes(rendered) == driver
