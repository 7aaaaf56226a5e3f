// node-opcua's answers for labctl's OPC UA conformance table.
//
// Run by tests/protocol/opcua/test_conformance_opcua.py as
//     node conformance.js '<json config>'
// with config {url, user, password, namespace, pki, timeoutMs,
//              browse: [folders..., PV browse name], major: PV, invalid: [PV...],
//              enumPv: PV, enumIndex: n, alarmSource: PV}.
//
// It connects with user name and password over Basic256Sha256 SignAndEncrypt and, one
// JSON line (prefixed "@labctl ") per row of the table:
//   browse        the BrowseName and DisplayName of the PV found by its browse path;
//   major         the value and StatusCode of a PV in MAJOR alarm;
//   invalid       the StatusCode and value of each INVALID PV;
//   enum          the StatusCode of writing enumIndex (UInt32) to a MultiStateDiscrete PV;
//   refresh       the events a ConditionRefresh delivers to a new event subscription on the
//                 Server object (where clause OfType(ConditionType)), up to RefreshEndEvent;
//   acknowledged  the StatusCode of Acknowledge(EventId, Comment) called on the ConditionId of
//                 alarmSource's refreshed condition, and the condition event that follows it.
// The last line is {"event": "done"} or {"event": "error", "message": ...}.
"use strict";

const {
    OPCUAClient,
    MessageSecurityMode,
    SecurityPolicy,
    AttributeIds,
    DataType,
    TimestampsToReturn,
    UserTokenType,
    resolveNodeId,
    constructEventFilter,
    ofType,
    callConditionRefresh,
    acknowledgeCondition,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

const config = JSON.parse(process.argv[2]);
const PREFIX = "@labctl ";
const REFRESH_START = "ns=0;i=2787";
const REFRESH_END = "ns=0;i=2788";
const FIELDS = ["EventId", "EventType", "SourceName", "Severity", "Retain", "ConditionId", "AckedState.Id", "ActiveState.Id", "Message"];

function emit(event, fields) {
    process.stdout.write(PREFIX + JSON.stringify({ event, ...fields }) + "\n");
}

function element(namespaceIndex, name) {
    return {
        referenceTypeId: resolveNodeId("HierarchicalReferences"),
        isInverse: false,
        includeSubtypes: true,
        targetName: { namespaceIndex, name },
    };
}

function asEvent(variants) {
    const v = (i) => (variants[i] ? variants[i].value : null);
    return {
        eventId: v(0) ? v(0).toString("hex") : null,
        eventType: v(1) ? v(1).toString() : null,
        sourceName: v(2),
        severity: v(3),
        retain: v(4),
        conditionId: v(5) ? v(5).toString() : null,
        acked: v(6),
        active: v(7),
        message: v(8) ? v(8).text : null,
    };
}

async function waitFor(predicate, what) {
    const deadline = Date.now() + config.timeoutMs;
    while (!predicate()) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
        await new Promise((resolve) => setTimeout(resolve, 20));
    }
}

async function main() {
    const certificateManager = new OPCUACertificateManager({ rootFolder: config.pki, automaticallyAcceptUnknownCertificate: true });
    await certificateManager.initialize();
    const client = OPCUAClient.create({
        applicationName: "labctl-conformance-node-opcua",
        securityMode: MessageSecurityMode.SignAndEncrypt,
        securityPolicy: SecurityPolicy.Basic256Sha256,
        clientCertificateManager: certificateManager,
        connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
        requestedSessionTimeout: 60000,
        keepSessionAlive: false,
    });
    await client.connect(config.url);
    const session = await client.createSession({ type: UserTokenType.UserName, userName: config.user, password: config.password });
    try {
        const namespaces = await session.readNamespaceArray();
        const ns = namespaces.indexOf(config.namespace);
        if (ns < 0) throw new Error(`namespace ${config.namespace} not offered`);
        const pv = (name) => resolveNodeId(`ns=${ns};s=${name}`);

        // browse: find the PV by its browse path, read its names
        const path = await session.translateBrowsePath({
            startingNode: resolveNodeId("i=85"),
            relativePath: { elements: config.browse.map((name) => element(ns, name)) },
        });
        if (!path.statusCode.isGood() || path.targets.length !== 1) throw new Error(`browse path ${config.browse.join("/")}: ${path.statusCode.toString()}`);
        const target = path.targets[0].targetId;
        const [browseName, displayName] = await session.read([
            { nodeId: target, attributeId: AttributeIds.BrowseName },
            { nodeId: target, attributeId: AttributeIds.DisplayName },
        ]);
        emit("browse", { nodeId: target.toString(), browseName: browseName.value.value.name, displayName: displayName.value.value.text });

        // major: a PV in MAJOR alarm
        const major = await session.read({ nodeId: pv(config.major), attributeId: AttributeIds.Value });
        emit("major", { status: major.statusCode.name, value: major.value.value });

        // invalid: each INVALID PV
        for (const name of config.invalid) {
            const dv = await session.read({ nodeId: pv(name), attributeId: AttributeIds.Value });
            emit("invalid", { pv: name, status: dv.statusCode.name, value: dv.value.value === undefined ? null : dv.value.value });
        }

        // enum: a state index outside the EnumStrings
        const written = await session.write({
            nodeId: pv(config.enumPv),
            attributeId: AttributeIds.Value,
            value: { value: { dataType: DataType.UInt32, value: config.enumIndex } },
        });
        emit("enum", { status: written.name });

        // refresh: a new event subscription, then ConditionRefresh
        const subscription = await session.createSubscription2({
            requestedPublishingInterval: 50,
            requestedLifetimeCount: 6000,
            requestedMaxKeepAliveCount: 20,
            maxNotificationsPerPublish: 1000,
            publishingEnabled: true,
            priority: 10,
        });
        const events = [];
        const item = await subscription.monitor(
            { nodeId: resolveNodeId("i=2253"), attributeId: AttributeIds.EventNotifier },
            { samplingInterval: 0, queueSize: 1000, discardOldest: false, filter: constructEventFilter(FIELDS, ofType("ConditionType")) },
            TimestampsToReturn.Both,
        );
        item.on("changed", (variants) => events.push(asEvent(variants)));
        const refreshed = await callConditionRefresh(session, subscription.subscriptionId);
        await waitFor(() => events.some((e) => e.eventType === REFRESH_END), "RefreshEndEvent");
        const bracket = events.slice(0, events.findIndex((e) => e.eventType === REFRESH_END) + 1);
        emit("refresh", { status: refreshed.name, events: bracket });

        // acknowledged: the refreshed condition, by its ConditionId and EventId
        const condition = bracket.find((e) => e.sourceName === config.alarmSource && e.conditionId);
        if (!condition) throw new Error(`no refreshed condition of ${config.alarmSource}`);
        const seen = events.length;
        const acked = await acknowledgeCondition(session, resolveNodeId(condition.conditionId), Buffer.from(condition.eventId, "hex"), "seen by node-opcua");
        if (acked.isGood()) {
            await waitFor(() => events.slice(seen).some((e) => e.sourceName === config.alarmSource && e.acked === true), "the acknowledged condition");
        }
        emit("acknowledged", { status: acked.name, condition: events.slice(seen).find((e) => e.sourceName === config.alarmSource && e.acked === true) || null });
        await subscription.terminate();
        emit("done", {});
    } finally {
        await session.close();
        await client.disconnect();
    }
}

main().catch((err) => {
    emit("error", { message: String(err && err.stack ? err.stack : err) });
    process.exit(1);
});
