// HistoryRead with an independent OPC UA client (node-opcua), for labctl's interoperability tests.
//
// Run by tests/protocol/opcua/test_node_opcua.py as
//     node history.js '<json config>'
// with config {url, namespace, pv, start, end (ISO 8601), pageSize, intervalMs}.
//
// It connects anonymously (security None), addresses the PV by its NodeId ns=<idx>;s=<PV>,
// and reports, one JSON line each (prefixed "@labctl "):
//   "raw"     -- HistoryReadRaw of [start, end) in one call (readHistoryValue);
//   "paged"   -- the same range pageSize values at a time, following continuation points;
//   "average" -- HistoryReadProcessed with the Average aggregate per intervalMs (readAggregateValue);
// then {"event": "done"} or {"event": "error", "message": ...}.
"use strict";

const {
    OPCUAClient,
    MessageSecurityMode,
    SecurityPolicy,
    AggregateFunction,
    HistoryReadRequest,
    ReadRawModifiedDetails,
    TimestampsToReturn,
    resolveNodeId,
} = require("node-opcua-client");

const config = JSON.parse(process.argv[2]);
const PREFIX = "@labctl ";

function emit(event, fields) {
    process.stdout.write(PREFIX + JSON.stringify({ event, ...fields }) + "\n");
}

function summary(dataValues) {
    return {
        values: dataValues.map((dv) => (dv.value ? dv.value.value : null)),
        times: dataValues.map((dv) => (dv.sourceTimestamp ? dv.sourceTimestamp.toISOString() : null)),
        statuses: dataValues.map((dv) => dv.statusCode.name),
    };
}

async function main() {
    const client = OPCUAClient.create({
        applicationName: "labctl-history-node-opcua",
        securityMode: MessageSecurityMode.None,
        securityPolicy: SecurityPolicy.None,
        endpointMustExist: false,
        connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
        requestedSessionTimeout: 60000,
        keepSessionAlive: false,
    });
    await client.connect(config.url);
    const session = await client.createSession();
    emit("connected", {});
    try {
        const namespaces = await session.readNamespaceArray();
        const ns = namespaces.indexOf(config.namespace);
        if (ns < 0) throw new Error(`namespace ${config.namespace} not offered: ${namespaces}`);
        const nodeId = resolveNodeId(`ns=${ns};s=${config.pv}`);
        const start = new Date(config.start);
        const end = new Date(config.end);

        const raw = await session.readHistoryValue({ nodeId }, start, end, { numValuesPerNode: 0, returnBounds: false });
        emit("raw", { status: raw.statusCode.name, ...summary(raw.historyData.dataValues) });

        let continuationPoint = null;
        const all = [];
        let pages = 0;
        do {
            const response = await session.historyRead(
                new HistoryReadRequest({
                    historyReadDetails: new ReadRawModifiedDetails({
                        isReadModified: false,
                        startTime: start,
                        endTime: end,
                        numValuesPerNode: config.pageSize,
                        returnBounds: false,
                    }),
                    timestampsToReturn: TimestampsToReturn.Source,
                    releaseContinuationPoints: false,
                    nodesToRead: [{ nodeId, continuationPoint }],
                }),
            );
            const result = response.results[0];
            if (!result.statusCode.isGood()) throw new Error(`paged read: ${result.statusCode.toString()}`);
            all.push(...result.historyData.dataValues);
            continuationPoint = result.continuationPoint && result.continuationPoint.length ? result.continuationPoint : null;
            pages += 1;
            if (pages > 1000) throw new Error("the server keeps returning continuation points");
        } while (continuationPoint);
        emit("paged", { pages, ...summary(all) });

        const average = await session.readAggregateValue({ nodeId }, start, end, AggregateFunction.Average, config.intervalMs);
        emit("average", { status: average.statusCode.name, ...summary(average.historyData.dataValues) });
        emit("done", {});
    } finally {
        await session.close();
        await client.disconnect();
    }
}

main().then(
    () => process.exit(0),
    (err) => {
        emit("error", { message: String((err && err.message) || err) });
        process.exit(1);
    },
);
