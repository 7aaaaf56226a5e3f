// An independent OPC UA client (node-opcua) for labctl's interoperability tests.
//
// Run by tests/protocol/opcua/test_node_opcua.py as
//     node interop.js '<json config>'
// with config {url, user, password, namespace, path: [folders..., PV browse name],
//              write, changes, pki, timeoutMs, expectRefusal, lock}.
//
// It connects with user name and password over Basic256Sha256 SignAndEncrypt, finds the
// PV by its browse path from Objects, reads its value, UserAccessLevel and
// EngineeringUnits, writes it, subscribes and reports every data change. With
// lock: [folders..., resource] it first takes the resource's Part 100 lock (the DI
// LockingServicesType object "Lock" under it: InitLock, then Locked, LockingUser and the
// PV's UserAccessLevel again), and releases it with ExitLock after the write. Each step is
// one JSON line on stdout (prefixed "@labctl "), so the Python test can act on them (e.g. post values once
// "subscribed" arrives); the last line is {"event": "done", ...} or {"event": "error", ...}.
"use strict";

const {
    OPCUAClient,
    MessageSecurityMode,
    SecurityPolicy,
    AttributeIds,
    DataType,
    TimestampsToReturn,
    ClientSubscription,
    ClientMonitoredItem,
    UserTokenType,
    resolveNodeId,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

const config = JSON.parse(process.argv[2]);

// node-opcua logs to stdout too: our lines carry a prefix the test looks for.
const PREFIX = "@labctl ";

function emit(event, fields) {
    process.stdout.write(PREFIX + JSON.stringify({ event, ...fields }) + "\n");
}

function pathElement(namespaceIndex, name, referenceTypeId) {
    return {
        referenceTypeId: resolveNodeId(referenceTypeId),
        isInverse: false,
        includeSubtypes: true,
        targetName: { namespaceIndex, name },
    };
}

async function translate(session, startingNode, elements) {
    const result = await session.translateBrowsePath({ startingNode: resolveNodeId(startingNode), relativePath: { elements } });
    if (!result.statusCode.isGood() || result.targets.length !== 1) {
        throw new Error(`browse path ${elements.map((e) => e.targetName.name).join("/")} not found: ${result.statusCode.toString()}`);
    }
    return result.targets[0].targetId;
}

async function main() {
    const certificateManager = new OPCUACertificateManager({
        rootFolder: config.pki,
        automaticallyAcceptUnknownCertificate: true,
    });
    await certificateManager.initialize();
    const client = OPCUAClient.create({
        applicationName: "labctl-interop-node-opcua",
        securityMode: MessageSecurityMode.SignAndEncrypt,
        securityPolicy: SecurityPolicy.Basic256Sha256,
        clientCertificateManager: certificateManager,
        connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
        requestedSessionTimeout: 60000,
        keepSessionAlive: false,
    });
    await client.connect(config.url);
    const session = await client.createSession({ type: UserTokenType.UserName, userName: config.user, password: config.password });
    emit("connected", { securityMode: MessageSecurityMode[client.securityMode], user: config.user });
    try {
        const namespaces = await session.readNamespaceArray();
        const ns = namespaces.indexOf(config.namespace);
        if (ns < 0) throw new Error(`namespace ${config.namespace} not offered: ${namespaces}`);
        const elements = config.path.map((name) => pathElement(ns, name, "HierarchicalReferences"));
        const pv = await translate(session, "i=85", elements);
        const eu = await translate(session, pv.toString(), [pathElement(0, "EngineeringUnits", "HasProperty")]);
        const [value, userAccess, units] = await session.read([
            { nodeId: pv, attributeId: AttributeIds.Value },
            { nodeId: pv, attributeId: AttributeIds.UserAccessLevel },
            { nodeId: eu, attributeId: AttributeIds.Value },
        ]);
        const info = units.value.value;
        emit("read", {
            nodeId: pv.toString(),
            value: value.value.value,
            status: value.statusCode.name,
            userAccessLevel: userAccess.value.value,
            unit: { unitId: info.unitId, displayName: info.displayName.text, namespaceUri: info.namespaceUri },
        });

        let lock = null;
        const di = namespaces.indexOf("http://opcfoundation.org/UA/DI/");
        if (config.lock) {
            if (di < 0) throw new Error("the DI namespace is not offered");
            const owner = config.lock.map((name) => pathElement(ns, name, "HierarchicalReferences"));
            lock = await translate(session, "i=85", [...owner, pathElement(di, "Lock", "HasComponent")]);
            const init = await translate(session, lock.toString(), [pathElement(di, "InitLock", "HasComponent")]);
            const result = await session.call({
                objectId: lock,
                methodId: init,
                inputArguments: [{ dataType: DataType.String, value: "node-opcua interop" }],
            });
            emit("lock", { status: result.statusCode.name, initLockStatus: result.outputArguments[0].value });
            const locked = await translate(session, lock.toString(), [pathElement(di, "Locked", "HasProperty")]);
            const user = await translate(session, lock.toString(), [pathElement(di, "LockingUser", "HasProperty")]);
            const [isLocked, lockingUser, access] = await session.read([
                { nodeId: locked, attributeId: AttributeIds.Value },
                { nodeId: user, attributeId: AttributeIds.Value },
                { nodeId: pv, attributeId: AttributeIds.UserAccessLevel },
            ]);
            emit("locked", { locked: isLocked.value.value, lockingUser: lockingUser.value.value, userAccessLevel: access.value.value });
        }

        const written = await session.write({
            nodeId: pv,
            attributeId: AttributeIds.Value,
            value: { value: { dataType: DataType.Double, value: config.write } },
        });
        emit("write", { status: written.name });
        if (config.expectRefusal) {
            emit("done", {});
            return;
        }
        const readBack = await session.read({ nodeId: pv, attributeId: AttributeIds.Value });
        emit("readback", { value: readBack.value.value });
        if (lock) {
            const exit = await translate(session, lock.toString(), [pathElement(di, "ExitLock", "HasComponent")]);
            const result = await session.call({ objectId: lock, methodId: exit, inputArguments: [] });
            emit("unlocked", { status: result.statusCode.name, exitLockStatus: result.outputArguments[0].value });
        }

        const subscription = ClientSubscription.create(session, {
            requestedPublishingInterval: 50,
            requestedLifetimeCount: 600,
            requestedMaxKeepAliveCount: 20,
            maxNotificationsPerPublish: 1000,
            publishingEnabled: true,
            priority: 0,
        });
        const values = [];
        const enough = new Promise((resolve) => {
            const item = ClientMonitoredItem.create(
                subscription,
                { nodeId: pv, attributeId: AttributeIds.Value },
                { samplingInterval: 0, discardOldest: true, queueSize: 100 },
                TimestampsToReturn.Both,
            );
            item.on("initialized", () => emit("subscribed", {}));
            item.on("changed", (dataValue) => {
                values.push(dataValue.value.value);
                emit("change", { value: dataValue.value.value, status: dataValue.statusCode.name });
                if (values.length >= config.changes + 1) resolve();
            });
        });
        let timer;
        const timeout = new Promise((_, reject) => {
            timer = setTimeout(() => reject(new Error(`only ${values.length} data changes within ${config.timeoutMs} ms`)), config.timeoutMs);
        });
        await Promise.race([enough, timeout]);
        clearTimeout(timer);
        await subscription.terminate();
        emit("done", { values });
    } finally {
        await session.close();
        await client.disconnect();
        await certificateManager.dispose();
    }
}

main().then(
    () => process.exit(0),
    (err) => {
        emit("error", { message: String((err && err.message) || err) });
        process.exit(1);
    },
);
